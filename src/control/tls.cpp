#include "control/tls.hpp"

#include <arpa/inet.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include <algorithm>
#include <ctime>

namespace smtplb {

namespace {

// The oldest error in OpenSSL's queue (the cause; later entries are consequences), and an
// empty queue afterwards.
std::string take_openssl_error(const char* fallback) {
  const unsigned long e = ERR_get_error();
  std::string text = fallback;
  if (e != 0) {
    if (const char* reason = ERR_reason_error_string(e)) {
      text = reason;
    } else {
      char buf[256];
      ERR_error_string_n(e, buf, sizeof buf);
      text = buf;
    }
  }
  ERR_clear_error();
  return text;
}

int64_t to_unix_seconds(const ASN1_TIME* t) {
  struct tm tm {};
  if (t == nullptr || ASN1_TIME_to_tm(t, &tm) != 1) return 0;
  return int64_t(timegm(&tm));
}

// "CN=mx.example.net,O=Example" (RFC 2253, non-ASCII escaped), short enough for a log line.
std::string subject_of(X509* cert) {
  if (cert == nullptr) return "?";
  BIO* bio = BIO_new(BIO_s_mem());
  if (bio == nullptr) return "?";
  X509_NAME_print_ex(bio, X509_get_subject_name(cert), 0, XN_FLAG_RFC2253);
  char* data = nullptr;
  const long len = BIO_get_mem_data(bio, &data);
  std::string s = len > 0 ? std::string(data, size_t(len)) : std::string("(empty subject)");
  BIO_free(bio);
  if (s.size() > 200) s = s.substr(0, 197) + "...";
  return s;
}

}  // namespace

bool is_ip_literal(std::string_view host) {
  const std::string h(host);
  unsigned char buf[sizeof(in6_addr)];
  return inet_pton(AF_INET, h.c_str(), buf) == 1 || inet_pton(AF_INET6, h.c_str(), buf) == 1;
}

std::shared_ptr<TlsContext> TlsContext::create(const TlsContextOptions& options, std::string& error) {
  ERR_clear_error();
  SSL_CTX* ctx = SSL_CTX_new(TLS_client_method());
  if (ctx == nullptr) {
    error = "tls setup: " + take_openssl_error("cannot create an SSL context");
    return nullptr;
  }
  // Every check is a fresh handshake, so each one really sees the current certificate.
  SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
  if (options.verify) {
    const int ok = options.ca_file.empty() ? SSL_CTX_set_default_verify_paths(ctx)
                                           : SSL_CTX_load_verify_locations(ctx, options.ca_file.c_str(), nullptr);
    if (ok != 1) {
      error = "tls setup: cannot load " +
              (options.ca_file.empty() ? std::string("the system CA store") : "tls_ca_file " + options.ca_file) + ": " +
              take_openssl_error("unknown error");
      SSL_CTX_free(ctx);
      return nullptr;
    }
  }
  ERR_clear_error();
  return std::shared_ptr<TlsContext>(new TlsContext(ctx, options.verify));
}

TlsContext::~TlsContext() {
  SSL_CTX_free(ctx_);
}

TlsClient::TlsClient(std::shared_ptr<TlsContext> ctx, SSL* ssl, BIO* in, BIO* out)
    : ctx_(std::move(ctx)), ssl_(ssl), in_(in), out_(out) {}

TlsClient::~TlsClient() {
  SSL_free(ssl_);
}

std::unique_ptr<TlsClient> TlsClient::create(std::shared_ptr<TlsContext> ctx, std::string_view name,
                                             std::string_view sni, std::string& error) {
  ERR_clear_error();
  SSL* ssl = SSL_new(ctx->native());
  BIO* in = BIO_new(BIO_s_mem());
  BIO* out = BIO_new(BIO_s_mem());
  if (ssl == nullptr || in == nullptr || out == nullptr) {
    error = "tls setup: " + take_openssl_error("out of memory");
    BIO_free(in);
    BIO_free(out);
    SSL_free(ssl);
    return nullptr;
  }
  SSL_set_bio(ssl, in, out);
  SSL_set_connect_state(ssl);
  const bool verify = ctx->verify();
  std::unique_ptr<TlsClient> c(new TlsClient(std::move(ctx), ssl, in, out));
  SSL_set_app_data(ssl, c.get());
  c->name_ = std::string(name);

  bool ok = true;
  if (verify) {
    SSL_set_verify(ssl, SSL_VERIFY_PEER, &TlsClient::verify_callback);
    if (c->name_.empty()) {
      // Only the chain is checked; the callers always pass a name.
    } else if (is_ip_literal(c->name_)) {
      ok = X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(ssl), c->name_.c_str()) == 1;
    } else {
      // Like Postfix and curl: "*" only as a whole left-most label.
      SSL_set_hostflags(ssl, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
      ok = SSL_set1_host(ssl, c->name_.c_str()) == 1;
    }
  } else {
    SSL_set_verify(ssl, SSL_VERIFY_NONE, nullptr);
  }
  if (ok && !sni.empty() && !is_ip_literal(sni)) ok = SSL_set_tlsext_host_name(ssl, std::string(sni).c_str()) == 1;
  if (!ok) {
    error = "tls setup: cannot use the name \"" + c->name_ + "\": " + take_openssl_error("invalid name");
    return nullptr;
  }
  ERR_clear_error();
  return c;
}

int TlsClient::verify_callback(int ok, X509_STORE_CTX* store) {
  if (ok) return ok;
  auto* ssl = static_cast<SSL*>(X509_STORE_CTX_get_ex_data(store, SSL_get_ex_data_X509_STORE_CTX_idx()));
  auto* self = ssl ? static_cast<TlsClient*>(SSL_get_app_data(ssl)) : nullptr;
  if (self != nullptr && self->verify_depth_ < 0) {
    self->verify_depth_ = X509_STORE_CTX_get_error_depth(store);
    self->verify_subject_ = subject_of(X509_STORE_CTX_get_current_cert(store));
  }
  return ok;  // the first error ends the handshake (SSL_VERIFY_PEER)
}

void TlsClient::feed(std::string_view ciphertext) {
  // A memory BIO grows as needed, so a write only fails when memory runs out; the
  // handshake or read that follows then fails with OpenSSL's reason.
  while (!ciphertext.empty()) {
    const int chunk = int(std::min<size_t>(ciphertext.size(), 1 << 20));
    const int n = BIO_write(in_, ciphertext.data(), chunk);
    if (n <= 0) break;
    ciphertext.remove_prefix(size_t(n));
  }
}

void TlsClient::feed_eof() {
  BIO_set_mem_eof_return(in_, 0);
}

bool TlsClient::has_output() const {
  return BIO_ctrl_pending(out_) > 0;
}

std::string TlsClient::take_output() {
  std::string s(BIO_ctrl_pending(out_), '\0');
  if (s.empty()) return s;
  const int n = BIO_read(out_, s.data(), int(s.size()));
  s.resize(n > 0 ? size_t(n) : 0);
  return s;
}

TlsClient::Status TlsClient::handshake() {
  if (failed_) return Status::error;
  if (established_) return Status::ok;
  ERR_clear_error();
  const int ret = SSL_do_handshake(ssl_);
  if (ret != 1) return fail(ret, "tls handshake");
  established_ = true;
  if (X509* peer = SSL_get0_peer_certificate(ssl_)) not_after_ = to_unix_seconds(X509_get0_notAfter(peer));
  ERR_clear_error();
  return Status::ok;
}

TlsClient::Status TlsClient::write(std::string_view plaintext) {
  if (failed_) return Status::error;
  if (!established_) {
    failed_ = true;
    error_ = "tls write: handshake not finished";
    return Status::error;
  }
  while (!plaintext.empty()) {
    ERR_clear_error();
    size_t written = 0;
    const int ret = SSL_write_ex(ssl_, plaintext.data(), plaintext.size(), &written);
    if (ret != 1) {
      const Status s = fail(ret, "tls write");
      if (s != Status::error) {
        // A memory BIO never pushes back, so this is a renegotiation or similar we do not
        // take part in mid-check.
        failed_ = true;
        error_ = "tls write: peer wants to renegotiate";
        return Status::error;
      }
      return s;
    }
    plaintext.remove_prefix(written);
  }
  return Status::ok;
}

TlsClient::Status TlsClient::read(std::string& plaintext) {
  if (failed_) return Status::error;
  bool got = false;
  char buf[4096];
  for (;;) {
    ERR_clear_error();
    size_t n = 0;
    const int ret = SSL_read_ex(ssl_, buf, sizeof buf, &n);
    if (ret == 1) {
      plaintext.append(buf, n);
      got = true;
      continue;
    }
    const Status s = fail(ret, "tls read");
    if (s == Status::error) return s;
    return got ? Status::ok : s;
  }
}

void TlsClient::shutdown() {
  if (!established_ || failed_) return;
  ERR_clear_error();
  SSL_shutdown(ssl_);
  ERR_clear_error();
}

long TlsClient::verify_result() const {
  return SSL_get_verify_result(ssl_);
}

std::string TlsClient::description() const {
  if (!established_) return "no TLS session";
  return std::string(SSL_get_version(ssl_)) + " " + SSL_get_cipher_name(ssl_);
}

TlsClient::Status TlsClient::fail(int ret, const char* what) {
  const int e = SSL_get_error(ssl_, ret);
  if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
    ERR_clear_error();
    return Status::want_read;
  }
  if (e == SSL_ERROR_ZERO_RETURN) {
    ERR_clear_error();
    return Status::closed;
  }
  failed_ = true;
  const long v = SSL_get_verify_result(ssl_);
  if (!established_ && ctx_->verify() && v != X509_V_OK) {
    error_ = std::string("tls verify: ") + X509_verify_cert_error_string(v) + " (";
    if (verify_depth_ >= 0)
      error_ += "depth " + std::to_string(verify_depth_) + ", subject " + verify_subject_;
    else
      error_ += "no certificate details";
    if (v == X509_V_ERR_HOSTNAME_MISMATCH || v == X509_V_ERR_IP_ADDRESS_MISMATCH) error_ += ", expected " + name_;
    error_ += ")";
    ERR_clear_error();
  } else if (e == SSL_ERROR_SSL) {
    error_ = std::string(what) + ": " + take_openssl_error("protocol error");
  } else {
    // SSL_ERROR_SYSCALL: with memory BIOs only the end of the stream gets here.
    error_ = std::string(what) + ": " + take_openssl_error("connection closed by the server");
  }
  return Status::error;
}

}  // namespace smtplb
