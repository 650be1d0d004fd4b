# SMTPLB_PORTABLE (the package build, scripts/package.sh): one binary for the .deb and
# the .rpm, built on Debian 12 and run on RHEL 9 too. It needs no shared library that
# only Debian has: fmt, spdlog and toml++ are compiled in header-only, libuv is linked
# statically; libstdc++, libgcc_s, glibc and OpenSSL 3 (libssl.so.3/libcrypto.so.3) stay
# shared, as every target system has them. tests/packaging/check-binary.sh checks the
# symbol versions (GLIBC <= 2.34, GLIBCXX <= 3.4.29, OPENSSL_3.0.0) and NEEDED entries.
#
# The targets keep the names the rest of the build links against (PkgConfig::LIBUV,
# PkgConfig::TOMLPP, fmt::fmt, spdlog::spdlog), so nothing else changes.

# libuv-static.pc (libuv1-dev): -luv_a -lpthread -ldl -lrt, found as the .a archive.
pkg_check_modules(LIBUV REQUIRED IMPORTED_TARGET libuv-static)
# Make sure it is the archive, not a shared libuv that happens to be called libuv_a.
get_target_property(_smtplb_uv_libs PkgConfig::LIBUV INTERFACE_LINK_LIBRARIES)
if(NOT _smtplb_uv_libs MATCHES "libuv_a\\.a")
  message(FATAL_ERROR "SMTPLB_PORTABLE: libuv-static.pc did not resolve to libuv_a.a: ${_smtplb_uv_libs}")
endif()

# toml++: the headers carry the implementation when TOML_HEADER_ONLY=1 (tomlplusplus.pc
# asks for the shared library instead).
find_path(SMTPLB_TOMLPP_INCLUDE toml++/toml.h REQUIRED)
add_library(PkgConfig::TOMLPP INTERFACE IMPORTED)
set_target_properties(PkgConfig::TOMLPP PROPERTIES
  INTERFACE_INCLUDE_DIRECTORIES "${SMTPLB_TOMLPP_INCLUDE}"
  INTERFACE_COMPILE_DEFINITIONS "TOML_HEADER_ONLY=1")

# fmt 9 (libfmt-dev) and spdlog 1.10 with external fmt (libspdlog-dev): both ship their
# *-inl.h sources, so header-only mode needs only the defines. Not find_package(): their
# exported targets link the shared libraries.
find_path(SMTPLB_FMT_INCLUDE fmt/format-inl.h REQUIRED)
find_path(SMTPLB_SPDLOG_INCLUDE spdlog/spdlog-inl.h REQUIRED)
add_library(fmt::fmt INTERFACE IMPORTED)
set_target_properties(fmt::fmt PROPERTIES
  INTERFACE_INCLUDE_DIRECTORIES "${SMTPLB_FMT_INCLUDE}"
  INTERFACE_COMPILE_DEFINITIONS "FMT_HEADER_ONLY=1")
add_library(spdlog::spdlog INTERFACE IMPORTED)
set_target_properties(spdlog::spdlog PROPERTIES
  INTERFACE_INCLUDE_DIRECTORIES "${SMTPLB_SPDLOG_INCLUDE}"
  INTERFACE_COMPILE_DEFINITIONS "SPDLOG_FMT_EXTERNAL"
  INTERFACE_LINK_LIBRARIES "fmt::fmt;Threads::Threads")

# Distribution hardening flags (what dpkg-buildflags gives a Debian package), and no
# NEEDED entry for a library nothing uses.
set(CMAKE_POSITION_INDEPENDENT_CODE ON)
include(CheckPIESupported)
check_pie_supported()
add_compile_options(-fstack-protector-strong -fstack-clash-protection -fcf-protection
  $<$<NOT:$<CONFIG:Debug>>:-D_FORTIFY_SOURCE=2>)
add_link_options(-Wl,-z,relro -Wl,-z,now -Wl,--as-needed)
