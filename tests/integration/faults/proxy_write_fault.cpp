// LD_PRELOAD fault injector for exact fault cases the kernel cannot be made to produce
// on demand: the write of a PROXY protocol header fails with ECONNRESET.
//   SMTPLB_FAULT_SEND_PROXY=N   the first N send() calls that carry a PROXY header fail
//                                (smtplb's data path writes with send())
//   SMTPLB_FAULT_WRITE_PROXY=N  likewise for write()/writev() (libuv, health checks)
// Nothing else is touched: every other call goes to the next definition (libc, or a
// sanitizer's interceptor). Built with the tests, never installed.
#include <dlfcn.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>

namespace {

bool is_proxy_header(const void* buf, size_t len) {
  static const unsigned char v2[12] = {'\r', '\n', '\r', '\n', 0, '\r', '\n', 'Q', 'U', 'I', 'T', '\n'};
  return (len >= sizeof v2 && std::memcmp(buf, v2, sizeof v2) == 0) || (len >= 6 && std::memcmp(buf, "PROXY ", 6) == 0);
}

// Takes one fault from the budget named by `var` (read once); false when none is left.
bool take(const char* var, std::atomic<int>& left, std::atomic<bool>& loaded) {
  if (!loaded.exchange(true)) {
    const char* v = std::getenv(var);
    left.store(v ? std::atoi(v) : 0);
  }
  int n = left.load();
  while (n > 0)
    if (left.compare_exchange_weak(n, n - 1)) return true;
  return false;
}

std::atomic<int> send_left{0}, write_left{0};
std::atomic<bool> send_loaded{false}, write_loaded{false};

template <class F>
F next(const char* name) {
  return reinterpret_cast<F>(dlsym(RTLD_NEXT, name));
}

}  // namespace

extern "C" ssize_t send(int fd, const void* buf, size_t len, int flags) {
  static auto real = next<ssize_t (*)(int, const void*, size_t, int)>("send");
  if (is_proxy_header(buf, len) && take("SMTPLB_FAULT_SEND_PROXY", send_left, send_loaded)) {
    errno = ECONNRESET;
    return -1;
  }
  return real(fd, buf, len, flags);
}

extern "C" ssize_t write(int fd, const void* buf, size_t len) {
  static auto real = next<ssize_t (*)(int, const void*, size_t)>("write");
  if (is_proxy_header(buf, len) && take("SMTPLB_FAULT_WRITE_PROXY", write_left, write_loaded)) {
    errno = ECONNRESET;
    return -1;
  }
  return real(fd, buf, len);
}

extern "C" ssize_t writev(int fd, const struct iovec* iov, int n) {
  static auto real = next<ssize_t (*)(int, const struct iovec*, int)>("writev");
  if (n > 0 && is_proxy_header(iov[0].iov_base, iov[0].iov_len) &&
      take("SMTPLB_FAULT_WRITE_PROXY", write_left, write_loaded)) {
    errno = ECONNRESET;
    return -1;
  }
  return real(fd, iov, n);
}
