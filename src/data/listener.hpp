#pragma once
// Listening sockets: one SO_REUSEPORT socket per worker and listener, so the kernel
// spreads new connections over the workers without a shared accept lock.
#include <string>

#include "runtime/server_pool.hpp"

namespace smtplb {

// Creates `count` bound sockets for the listener (not yet listening) into lr.fds and sets
// lr.bound to the address actually bound (port 0 resolves to the kernel's choice).
bool bind_listener(ListenerRuntime& lr, unsigned count, std::string& error);

// Closes sockets in lr.fds that no worker adopted.
void close_listener_fds(ListenerRuntime& lr);

}  // namespace smtplb
