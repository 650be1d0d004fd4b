#include "smtplb/lb/agent_reply.hpp"

#include <algorithm>
#include <cctype>

namespace smtplb {

namespace {
std::string lower(std::string_view s) {
  std::string out(s);
  for (char& c : out) c = char(std::tolower(static_cast<unsigned char>(c)));
  return out;
}

std::string printable_word(std::string_view w) {
  std::string out;
  for (char c : w.substr(0, 32)) out += (c >= 0x20 && c < 0x7f) ? c : '?';
  return out;
}
}  // namespace

bool parse_agent_reply(std::string_view line, AgentReply& out, std::string& error) {
  out = AgentReply{};
  if (const size_t lf = line.find('\n'); lf != std::string_view::npos) line = line.substr(0, lf);
  if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
  if (const size_t hash = line.find('#'); hash != std::string_view::npos) {
    std::string_view d = line.substr(hash + 1);
    while (!d.empty() && (d.front() == ' ' || d.front() == '\t')) d.remove_prefix(1);
    // Kept printable and short: it goes into logs and /status.
    for (char c : d.substr(0, 200)) out.description += (c >= 0x20 && c < 0x7f) ? c : '?';
    line = line.substr(0, hash);
  }
  bool any = false;
  size_t i = 0;
  while (i < line.size()) {
    const char c = line[i];
    if (c == ' ' || c == '\t' || c == ',') {
      ++i;
      continue;
    }
    size_t j = i;
    while (j < line.size() && line[j] != ' ' && line[j] != '\t' && line[j] != ',') ++j;
    const std::string_view word = line.substr(i, j - i);
    i = j;
    any = true;
    const std::string w = lower(word);
    if (w.back() == '%') {
      const std::string_view digits = std::string_view(w).substr(0, w.size() - 1);
      if (digits.empty() || digits.size() > 3 ||
          !std::all_of(digits.begin(), digits.end(), [](char d) { return d >= '0' && d <= '9'; })) {
        error = "bad weight '" + printable_word(word) + "' (0% to 256%)";
        return false;
      }
      const uint32_t pct = uint32_t(std::stoul(std::string(digits)));
      if (pct > 256) {
        error = "bad weight '" + printable_word(word) + "' (0% to 256%)";
        return false;
      }
      out.weight_percent = pct;
    } else if (w == "ready") {
      out.admin = AdminState::ready;
    } else if (w == "drain") {
      out.admin = AdminState::drain;
    } else if (w == "maint") {
      out.admin = AdminState::maint;
    } else if (w == "up") {
      out.up = true;
    } else if (w == "down" || w == "failed" || w == "stopped") {
      out.up = false;
    } else if (w.rfind("maxconn:", 0) == 0 && w.size() > 8 &&
               std::all_of(w.begin() + 8, w.end(), [](char d) { return d >= '0' && d <= '9'; })) {
      // Accepted for compatibility with agents written for HAProxy; not applied.
    } else {
      error = "unknown word '" + printable_word(word) + "'";
      return false;
    }
  }
  if (!any) {
    error = "empty reply";
    return false;
  }
  return true;
}

uint32_t agent_scaled_weight(uint32_t weight, uint32_t percent) {
  if (weight == 0 || percent == 0) return 0;
  const uint64_t w = (uint64_t(weight) * percent + 50) / 100;
  return uint32_t(std::clamp<uint64_t>(w, 1, 256));
}

}  // namespace smtplb
