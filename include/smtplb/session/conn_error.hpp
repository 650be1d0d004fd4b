#pragma once
#include <array>
#include <cstdint>

namespace smtplb {

// Why a backend attempt of a client session failed (server_connection_errors_total).
enum class ConnError : uint8_t { refused, timeout, reset, banner };
inline constexpr std::array<const char*, 4> kConnErrorNames = {"refused", "timeout", "reset", "banner"};

}  // namespace smtplb
