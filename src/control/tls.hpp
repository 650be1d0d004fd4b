#pragma once
// Client side of TLS for the STARTTLS health check. The engine works on memory BIOs: the
// caller feeds it the ciphertext its socket received and sends what take_output() returns,
// so nothing here blocks, owns a socket or knows the event loop (and tests can pair it
// with an in-process server).
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

using SSL_CTX = struct ssl_ctx_st;
using SSL = struct ssl_st;
using BIO = struct bio_st;
using X509_STORE_CTX = struct x509_store_ctx_st;

namespace smtplb {

struct TlsContextOptions {
  bool verify = false;  // verify the chain and the name; otherwise any certificate is accepted
  std::string ca_file;  // trusted CAs (PEM) when verifying; empty: OpenSSL's default paths
};

// One SSL_CTX: the settings shared by every handshake of a checker or pool.
class TlsContext {
 public:
  // Null, with `error` set, when the trust store cannot be loaded.
  static std::shared_ptr<TlsContext> create(const TlsContextOptions& options, std::string& error);
  ~TlsContext();
  TlsContext(const TlsContext&) = delete;
  TlsContext& operator=(const TlsContext&) = delete;

  bool verify() const { return verify_; }
  SSL_CTX* native() const { return ctx_; }

 private:
  TlsContext(SSL_CTX* ctx, bool verify) : ctx_(ctx), verify_(verify) {}

  SSL_CTX* ctx_;
  bool verify_;
};

// One client connection's TLS state. Every failure leaves a complete, readable reason in
// error(), e.g. "tls handshake: wrong version number" or "tls verify: certificate has
// expired (depth 0, subject CN=mx.example.net)"; OpenSSL's error queue is always left
// empty, so nothing leaks into the next connection.
class TlsClient {
 public:
  enum class Status : uint8_t {
    ok,         // done (handshake finished, plaintext written, or some plaintext read)
    want_read,  // needs more ciphertext from the peer; send take_output() first
    closed,     // the peer sent close_notify
    error,      // see error()
  };

  // `name` is what the certificate must name when the context verifies: an IP literal is
  // checked against IP SANs, anything else as a DNS name. `sni` is sent as server_name
  // unless it is empty or an IP literal. Null, with `error` set, when OpenSSL fails.
  static std::unique_ptr<TlsClient> create(std::shared_ptr<TlsContext> ctx, std::string_view name, std::string_view sni,
                                           std::string& error);
  ~TlsClient();
  TlsClient(const TlsClient&) = delete;
  TlsClient& operator=(const TlsClient&) = delete;

  // Ciphertext received from the peer.
  void feed(std::string_view ciphertext);
  // The peer closed its side: reads past what was fed fail instead of waiting for more.
  void feed_eof();
  // Ciphertext to send to the peer (moved out; empty when there is none).
  bool has_output() const;
  std::string take_output();

  // Drives the handshake as far as the fed bytes allow. Once it returns ok the peer's
  // certificate has been verified (when the context verifies) and peer_not_after() is set.
  Status handshake();
  bool established() const { return established_; }

  // Encrypts `plaintext` into the output; only after the handshake.
  Status write(std::string_view plaintext);
  // Appends all plaintext that the fed bytes decrypt to; ok when at least one byte came.
  Status read(std::string& plaintext);
  // Queues close_notify in the output.
  void shutdown();

  const std::string& error() const { return error_; }
  // X509_V_OK (0) or the verification error of the last handshake.
  long verify_result() const;
  // notAfter of the peer's certificate as Unix seconds; 0 before a successful handshake.
  int64_t peer_not_after() const { return not_after_; }
  // "TLSv1.3 TLS_AES_256_GCM_SHA384", for logs.
  std::string description() const;

 private:
  TlsClient(std::shared_ptr<TlsContext> ctx, SSL* ssl, BIO* in, BIO* out);
  static int verify_callback(int ok, X509_STORE_CTX* store);
  Status fail(int ret, const char* what);

  std::shared_ptr<TlsContext> ctx_;  // kept alive for ssl_
  SSL* ssl_;
  BIO* in_;   // ciphertext from the peer; owned by ssl_
  BIO* out_;  // ciphertext to the peer; owned by ssl_
  std::string name_;
  bool established_ = false;
  bool failed_ = false;
  int64_t not_after_ = 0;
  // The first certificate that failed verification, for the reason: depth and subject.
  int verify_depth_ = -1;
  std::string verify_subject_;
  std::string error_;
};

// True for an IPv4 or IPv6 literal (without brackets).
bool is_ip_literal(std::string_view host);

}  // namespace smtplb
