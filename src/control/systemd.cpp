#include "control/systemd.hpp"

#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <ctime>

namespace smtplb {

SystemdNotifier::SystemdNotifier() {
  const char* p = std::getenv("NOTIFY_SOCKET");
  if (p && (p[0] == '/' || p[0] == '@') && std::strlen(p) < sizeof(sockaddr_un{}.sun_path)) path_ = p;
}

bool SystemdNotifier::notify(const std::string& message) const {
  if (path_.empty()) return true;
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, path_.data(), path_.size());
  if (addr.sun_path[0] == '@') addr.sun_path[0] = '\0';  // abstract namespace
  const socklen_t len = socklen_t(offsetof(sockaddr_un, sun_path) + path_.size());
  const int fd = ::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return false;
  const ssize_t n = ::sendto(fd, message.data(), message.size(), MSG_NOSIGNAL, reinterpret_cast<sockaddr*>(&addr), len);
  ::close(fd);
  return n == ssize_t(message.size());
}

void SystemdNotifier::reloading() const {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  const unsigned long long usec = (unsigned long long)ts.tv_sec * 1000000ULL + (unsigned long long)ts.tv_nsec / 1000;
  notify("RELOADING=1\nMONOTONIC_USEC=" + std::to_string(usec));
}

}  // namespace smtplb
