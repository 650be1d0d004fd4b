#include "data/listener.hpp"

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstring>

namespace smtplb {

namespace {

int open_one(const SocketAddress& addr, unsigned backlog, std::string& error) {
  int fd = ::socket(addr.family(), SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    error = std::string("socket: ") + std::strerror(errno);
    return -1;
  }
  int one = 1;
  ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (::setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one) != 0) {
    error = std::string("SO_REUSEPORT: ") + std::strerror(errno);
    ::close(fd);
    return -1;
  }
  // Accepted sockets inherit TCP_NODELAY (Linux): one call here instead of one per session.
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  // One listener per address family: "::" must not also take IPv4.
  if (addr.family() == AF_INET6) ::setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one);
  if (::bind(fd, addr.sa(), addr.len) != 0) {
    error = "cannot bind " + addr.to_string() + ": " + std::strerror(errno);
    ::close(fd);
    return -1;
  }
  // Listening from here on: clients queue in the backlog until a worker adopts the socket,
  // so a new listener never refuses a connection between a reload and the workers.
  if (::listen(fd, int(std::min<unsigned>(backlog, INT_MAX))) != 0) {
    error = "cannot listen on " + addr.to_string() + ": " + std::strerror(errno);
    ::close(fd);
    return -1;
  }
  return fd;
}

}  // namespace

bool bind_listener(ListenerRuntime& lr, unsigned count, std::string& error) {
  SocketAddress addr = lr.cfg->bind;
  for (unsigned i = 0; i < count; ++i) {
    int fd = open_one(addr, lr.backlog, error);
    if (fd < 0) {
      error = "listener " + lr.cfg->name + ": " + error;
      close_listener_fds(lr);
      return false;
    }
    lr.fds.push_back(fd);
    if (i == 0 && addr.port() == 0) {
      // Port 0: the first socket learns the kernel's port and the others join it.
      SocketAddress bound;
      bound.len = sizeof bound.storage;
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&bound.storage), &bound.len);
      addr.set_port(bound.port());
    }
  }
  lr.bound = addr;
  return true;
}

void close_listener_fds(ListenerRuntime& lr) {
  for (int fd : lr.fds)
    if (fd >= 0) ::close(fd);
  lr.fds.clear();
}

}  // namespace smtplb
