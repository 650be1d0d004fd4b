#pragma once
// A small client of systemd's notification protocol (sd_notify(3)): datagrams to the
// AF_UNIX socket named by $NOTIFY_SOCKET. Without the variable every call is a no-op.
#include <string>

namespace smtplb {

class SystemdNotifier {
 public:
  // Reads $NOTIFY_SOCKET ("/path" or "@abstract").
  SystemdNotifier();
  bool enabled() const { return !path_.empty(); }
  // Sends one message such as "READY=1\nSTATUS=...". Returns false on a send error.
  bool notify(const std::string& message) const;

  void ready(const std::string& status) const { notify("READY=1\nSTATUS=" + status); }
  // RELOADING=1 with the monotonic time systemd needs to match it to the reload.
  void reloading() const;
  void stopping() const { notify("STOPPING=1"); }

 private:
  std::string path_;
};

}  // namespace smtplb
