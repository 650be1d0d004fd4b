#pragma once
// Small helpers for libuv's C API.
#include <uv.h>

#include <string>

namespace smtplb {

template <typename T, typename H>
inline T* owner_of(H* handle) {
  return static_cast<T*>(handle->data);
}

inline uv_handle_t* as_handle(auto* h) {
  return reinterpret_cast<uv_handle_t*>(h);
}
inline uv_stream_t* as_stream(auto* h) {
  return reinterpret_cast<uv_stream_t*>(h);
}

inline std::string uv_error(int code) {
  return uv_strerror(code);
}

}  // namespace smtplb
