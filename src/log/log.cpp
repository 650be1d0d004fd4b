#include "log/log.hpp"

#include "smtplb/log/access_log.hpp"

#include <spdlog/sinks/base_sink.h>
#include <spdlog/sinks/syslog_sink.h>
#include <sys/stat.h>
#include <syslog.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>

namespace smtplb {

namespace {

constexpr const char* kPattern = "%Y-%m-%dT%H:%M:%S.%e%z %l: %v";

// syslog(3) priority of a level, for the "<N>" prefix journald reads from stderr.
int priority(spdlog::level::level_enum l) {
  switch (l) {
    case spdlog::level::trace:
    case spdlog::level::debug:
      return LOG_DEBUG;
    case spdlog::level::info:
      return LOG_INFO;
    case spdlog::level::warn:
      return LOG_WARNING;
    case spdlog::level::err:
      return LOG_ERR;
    case spdlog::level::critical:
      return LOG_CRIT;
    default:
      return LOG_INFO;
  }
}

// True when stderr is the stream systemd set up for this service (JOURNAL_STREAM).
bool stderr_is_journal() {
  const char* js = std::getenv("JOURNAL_STREAM");
  if (!js) return false;
  unsigned long long dev = 0, ino = 0;
  if (std::sscanf(js, "%llu:%llu", &dev, &ino) != 2) return false;
  struct stat st {};
  return fstat(2, &st) == 0 && st.st_dev == dev && st.st_ino == ino;
}

// One JSON object per line: {"time":...,"level":...,"msg":...}; an access line, logged
// as a rendered object, has its fields merged in instead of "msg".
class JsonFormatter final : public spdlog::formatter {
 public:
  void format(const spdlog::details::log_msg& msg, spdlog::memory_buf_t& dest) override {
    const auto t = std::chrono::system_clock::to_time_t(msg.time);
    const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(msg.time.time_since_epoch()).count() % 1000;
    tm tmv{};
    gmtime_r(&t, &tmv);
    fmt::format_to(std::back_inserter(dest),
                   "{{\"time\":\"{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z\",\"level\":\"{}\",", tmv.tm_year + 1900,
                   tmv.tm_mon + 1, tmv.tm_mday, tmv.tm_hour, tmv.tm_min, tmv.tm_sec, int(ms),
                   spdlog::level::to_string_view(msg.level));
    const std::string_view payload(msg.payload.data(), msg.payload.size());
    if (!payload.empty() && payload.front() == '{' && payload.back() == '}') {
      dest.append(payload.data() + 1, payload.data() + payload.size());
    } else {
      const std::string q = "\"msg\":" + json_quote(payload) + "}";
      dest.append(q.data(), q.data() + q.size());
    }
    dest.push_back('\n');
  }
  std::unique_ptr<spdlog::formatter> clone() const override { return std::make_unique<JsonFormatter>(); }
};

class StderrSink final : public spdlog::sinks::base_sink<std::mutex> {
 public:
  explicit StderrSink(bool journal) : journal_(journal) {}

 protected:
  void sink_it_(const spdlog::details::log_msg& msg) override {
    spdlog::memory_buf_t buf;
    // Under journald the prefix carries the priority (the text pattern then drops the
    // time, which journald stamps itself).
    if (journal_) fmt::format_to(std::back_inserter(buf), "<{}>", priority(msg.level));
    formatter_->format(msg, buf);
    std::fwrite(buf.data(), 1, buf.size(), stderr);
  }
  void flush_() override { std::fflush(stderr); }

 private:
  bool journal_;
};

class ReopenableFileSink final : public spdlog::sinks::base_sink<std::mutex> {
 public:
  explicit ReopenableFileSink(std::string path) : path_(std::move(path)) {}
  ~ReopenableFileSink() override {
    if (file_) std::fclose(file_);
  }

  bool open(std::string& error) {
    std::FILE* f = std::fopen(path_.c_str(), "a");
    if (!f) {
      error = "cannot open log file " + path_ + ": " + std::strerror(errno);
      return false;
    }
    std::lock_guard<std::mutex> lock(mutex_);
    if (file_) std::fclose(file_);
    file_ = f;
    return true;
  }

 protected:
  void sink_it_(const spdlog::details::log_msg& msg) override {
    spdlog::memory_buf_t buf;
    formatter_->format(msg, buf);
    if (file_) std::fwrite(buf.data(), 1, buf.size(), file_);
  }
  void flush_() override {
    if (file_) std::fflush(file_);
  }

 private:
  std::string path_;
  std::FILE* file_ = nullptr;
};

std::shared_ptr<ReopenableFileSink> g_file_sink;

}  // namespace

spdlog::level::level_enum to_spdlog(LogLevel level) {
  switch (level) {
    case LogLevel::trace:
      return spdlog::level::trace;
    case LogLevel::debug:
      return spdlog::level::debug;
    case LogLevel::info:
      return spdlog::level::info;
    case LogLevel::warn:
      return spdlog::level::warn;
    case LogLevel::error:
      return spdlog::level::err;
  }
  return spdlog::level::info;
}

bool setup_logging(const LogConfig& cfg, LogLevel level, std::string& error) {
  spdlog::sink_ptr sink;
  switch (cfg.target) {
    case LogTarget::stderr_stream:
      sink = std::make_shared<StderrSink>(stderr_is_journal());  // checked once: journald may not restart
      break;
    case LogTarget::syslog:
      sink = std::make_shared<spdlog::sinks::syslog_sink_mt>("smtplb", LOG_PID, LOG_MAIL, false);
      break;
    case LogTarget::file: {
      auto f = std::make_shared<ReopenableFileSink>(cfg.file);
      if (!f->open(error)) return false;
      g_file_sink = f;
      sink = f;
      break;
    }
  }
  auto logger = std::make_shared<spdlog::logger>("smtplb", sink);
  const bool journal = cfg.target == LogTarget::stderr_stream && stderr_is_journal();
  if (cfg.format == LogFormat::json)
    logger->set_formatter(std::make_unique<JsonFormatter>());
  else
    logger->set_pattern(cfg.target == LogTarget::syslog ? "%v" : journal ? "%l: %v" : kPattern);
  logger->set_level(to_spdlog(level));
  // Warnings and errors are rare and must not be lost in a crash right after them.
  logger->flush_on(spdlog::level::warn);
  spdlog::set_default_logger(logger);
  if (cfg.target == LogTarget::file) spdlog::flush_every(std::chrono::seconds(1));
  return true;
}

void set_log_level(LogLevel level) {
  spdlog::default_logger()->set_level(to_spdlog(level));
}

bool reopen_log(std::string& error) {
  if (!g_file_sink) return true;
  g_file_sink->flush();
  return g_file_sink->open(error);
}

}  // namespace smtplb
