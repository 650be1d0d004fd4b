#include <doctest/doctest.h>

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <memory>
#include <string>

#include "control/tls.hpp"

using smtplb::is_ip_literal;
using smtplb::TlsClient;
using smtplb::TlsContext;
using smtplb::TlsContextOptions;

namespace {

constexpr long kDay = 86400;

struct KeyFree {
  void operator()(EVP_PKEY* k) const { EVP_PKEY_free(k); }
};
struct CertFree {
  void operator()(X509* c) const { X509_free(c); }
};
using Key = std::unique_ptr<EVP_PKEY, KeyFree>;
using Cert = std::unique_ptr<X509, CertFree>;

Key make_key() {
  return Key(EVP_EC_gen("P-256"));
}

void add_ext(X509* cert, X509* issuer, int nid, const char* value) {
  X509V3_CTX ctx;
  X509V3_set_ctx_nodb(&ctx);
  X509V3_set_ctx(&ctx, issuer, cert, nullptr, nullptr, 0);
  X509_EXTENSION* ext = X509V3_EXT_conf_nid(nullptr, &ctx, nid, value);
  REQUIRE(ext != nullptr);
  X509_add_ext(cert, ext, -1);
  X509_EXTENSION_free(ext);
}

// A v3 certificate for `cn` valid from now+not_before to now+not_after (seconds), signed
// by `issuer` (self-signed when null). `san` like "DNS:mx.test,IP:127.0.0.1" (may be empty).
Cert make_cert(EVP_PKEY* key, const char* cn, const char* san, long not_before, long not_after, bool ca = false,
               X509* issuer = nullptr, EVP_PKEY* issuer_key = nullptr) {
  static long serial = 1;
  Cert cert(X509_new());
  X509_set_version(cert.get(), 2);
  ASN1_INTEGER_set(X509_get_serialNumber(cert.get()), serial++);
  X509_gmtime_adj(X509_getm_notBefore(cert.get()), not_before);
  X509_gmtime_adj(X509_getm_notAfter(cert.get()), not_after);
  X509_set_pubkey(cert.get(), key);
  X509_NAME* name = X509_get_subject_name(cert.get());
  X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC, reinterpret_cast<const unsigned char*>(cn), -1, -1, 0);
  X509* signer = issuer ? issuer : cert.get();
  X509_set_issuer_name(cert.get(), X509_get_subject_name(signer));
  add_ext(cert.get(), signer, NID_basic_constraints, ca ? "critical,CA:TRUE" : "critical,CA:FALSE");
  if (ca) add_ext(cert.get(), signer, NID_key_usage, "critical,keyCertSign,cRLSign");
  if (san && *san) add_ext(cert.get(), signer, NID_subject_alt_name, san);
  REQUIRE(X509_sign(cert.get(), issuer_key ? issuer_key : key, EVP_sha256()) > 0);
  return cert;
}

// A PEM file of certificates, removed when the object goes.
class PemFile {
 public:
  explicit PemFile(std::initializer_list<X509*> certs) {
    char tmpl[] = "/tmp/smtplb-test-tls-XXXXXX";
    int fd = mkstemp(tmpl);
    REQUIRE(fd >= 0);
    path_ = tmpl;
    FILE* f = fdopen(fd, "w");
    REQUIRE(f != nullptr);
    for (X509* c : certs) PEM_write_X509(f, c);
    fclose(f);
  }
  ~PemFile() { ::unlink(path_.c_str()); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// The other end: an OpenSSL server on memory BIOs, like a Postfix smtpd after STARTTLS.
class Server {
 public:
  Server(EVP_PKEY* key, X509* cert) {
    ctx_ = SSL_CTX_new(TLS_server_method());
    REQUIRE(SSL_CTX_use_certificate(ctx_, cert) == 1);
    REQUIRE(SSL_CTX_use_PrivateKey(ctx_, key) == 1);
    SSL_CTX_set_tlsext_servername_callback(ctx_, &Server::on_sni);
    SSL_CTX_set_tlsext_servername_arg(ctx_, this);
    ssl_ = SSL_new(ctx_);
    in_ = BIO_new(BIO_s_mem());
    out_ = BIO_new(BIO_s_mem());
    SSL_set_bio(ssl_, in_, out_);
    SSL_set_accept_state(ssl_);
  }
  ~Server() {
    SSL_free(ssl_);
    SSL_CTX_free(ctx_);
  }

  void feed(const std::string& ciphertext) { BIO_write(in_, ciphertext.data(), int(ciphertext.size())); }
  std::string take_output() {
    std::string s(BIO_ctrl_pending(out_), '\0');
    if (!s.empty()) BIO_read(out_, s.data(), int(s.size()));
    return s;
  }
  // Advances the handshake; true once finished.
  bool step() {
    if (done_) return true;
    done_ = SSL_do_handshake(ssl_) == 1;
    ERR_clear_error();  // a failed handshake leaves errors in this thread's queue
    return done_;
  }
  std::string read() {
    std::string out;
    char buf[4096];
    size_t n = 0;
    while (SSL_read_ex(ssl_, buf, sizeof buf, &n) == 1) out.append(buf, n);
    ERR_clear_error();
    return out;
  }
  void write(const std::string& plaintext) {
    size_t n = 0;
    REQUIRE(SSL_write_ex(ssl_, plaintext.data(), plaintext.size(), &n) == 1);
  }
  void close_notify() { SSL_shutdown(ssl_); }
  const std::string& sni() const { return sni_; }

 private:
  static int on_sni(SSL* ssl, int*, void* arg) {
    const char* name = SSL_get_servername(ssl, TLSEXT_NAMETYPE_host_name);
    static_cast<Server*>(arg)->sni_ = name ? name : "";
    return SSL_TLSEXT_ERR_OK;
  }

  SSL_CTX* ctx_ = nullptr;
  SSL* ssl_ = nullptr;
  BIO* in_ = nullptr;
  BIO* out_ = nullptr;
  bool done_ = false;
  std::string sni_;
};

// Moves bytes both ways until the client's handshake is no longer waiting for input.
TlsClient::Status run_handshake(TlsClient& client, Server& server) {
  TlsClient::Status s = TlsClient::Status::want_read;
  for (int round = 0; round < 20 && s == TlsClient::Status::want_read; ++round) {
    s = client.handshake();
    server.feed(client.take_output());
    server.step();
    client.feed(server.take_output());
  }
  // The client's last flight (Finished) still has to reach the server.
  server.feed(client.take_output());
  server.step();
  return s;
}

std::shared_ptr<TlsContext> context(bool verify, const std::string& ca_file = "") {
  std::string error;
  auto ctx = TlsContext::create(TlsContextOptions{verify, ca_file}, error);
  REQUIRE_MESSAGE(ctx != nullptr, error);
  return ctx;
}

std::unique_ptr<TlsClient> client(std::shared_ptr<TlsContext> ctx, const char* name, const char* sni = "") {
  std::string error;
  auto c = TlsClient::create(std::move(ctx), name, sni, error);
  REQUIRE_MESSAGE(c != nullptr, error);
  return c;
}

// A test CA and a server certificate it signed; each test picks names and validity.
struct Pki {
  explicit Pki(const char* ca_name = "smtplb test CA")
      : ca(make_cert(ca_key.get(), ca_name, "", -kDay, 30 * kDay, true)) {}
  Key ca_key = make_key();
  Cert ca;
  Key key = make_key();
  Cert leaf(const char* cn, const char* san, long not_before = -kDay, long not_after = 30 * kDay) {
    return make_cert(key.get(), cn, san, not_before, not_after, false, ca.get(), ca_key.get());
  }
};

}  // namespace

TEST_CASE("tls: is_ip_literal") {
  CHECK(is_ip_literal("127.0.0.1"));
  CHECK(is_ip_literal("::1"));
  CHECK(is_ip_literal("2001:db8::25"));
  CHECK_FALSE(is_ip_literal("mx.example.net"));
  CHECK_FALSE(is_ip_literal("10.1"));
  CHECK_FALSE(is_ip_literal("[::1]"));
  CHECK_FALSE(is_ip_literal(""));
}

TEST_CASE("tls: without verification any certificate is accepted and its notAfter is read") {
  Key key = make_key();
  Cert cert = make_cert(key.get(), "whatever.test", "DNS:whatever.test", -kDay, 20 * kDay);
  Server server(key.get(), cert.get());
  auto c = client(context(false), "mx.example.net");
  CHECK_FALSE(c->established());
  CHECK(c->peer_not_after() == 0);

  REQUIRE(run_handshake(*c, server) == TlsClient::Status::ok);
  CHECK(c->established());
  CHECK(c->error().empty());
  CHECK(c->description().rfind("TLSv1.3 ", 0) == 0);
  const int64_t expected = int64_t(std::time(nullptr)) + 20 * kDay;
  CHECK(c->peer_not_after() >= expected - 5);
  CHECK(c->peer_not_after() <= expected + 5);
  CHECK(server.sni().empty());
  CHECK(ERR_peek_error() == 0);
}

TEST_CASE("tls: plaintext both ways, close_notify, shutdown") {
  Key key = make_key();
  Cert cert = make_cert(key.get(), "mx.test", "DNS:mx.test", -kDay, kDay);
  Server server(key.get(), cert.get());
  auto c = client(context(false), "mx.test");
  REQUIRE(run_handshake(*c, server) == TlsClient::Status::ok);

  // No application data yet (TLS 1.3 session tickets are consumed silently).
  std::string got;
  CHECK(c->read(got) == TlsClient::Status::want_read);
  CHECK(got.empty());

  REQUIRE(c->write("EHLO hc.test\r\n") == TlsClient::Status::ok);
  REQUIRE(c->has_output());
  server.feed(c->take_output());
  CHECK_FALSE(c->has_output());
  CHECK(server.read() == "EHLO hc.test\r\n");

  server.write("250-mx.test\r\n250 8BITMIME\r\n");
  std::string ciphertext = server.take_output();
  // Split anywhere: the engine waits for whole records.
  c->feed(std::string_view(ciphertext).substr(0, 7));
  CHECK(c->read(got) == TlsClient::Status::want_read);
  c->feed(std::string_view(ciphertext).substr(7));
  CHECK(c->read(got) == TlsClient::Status::ok);
  CHECK(got == "250-mx.test\r\n250 8BITMIME\r\n");

  server.close_notify();
  c->feed(server.take_output());
  got.clear();
  CHECK(c->read(got) == TlsClient::Status::closed);
  c->shutdown();
  CHECK(c->has_output());
  CHECK(ERR_peek_error() == 0);
}

TEST_CASE("tls: verification passes with the right CA and name, and SNI is sent") {
  Pki pki;
  Cert cert = pki.leaf("mail.test", "DNS:mail.test");
  PemFile ca({pki.ca.get()});
  Server server(pki.key.get(), cert.get());
  auto c = client(context(true, ca.path()), "mail.test", "mail.test");
  REQUIRE(run_handshake(*c, server) == TlsClient::Status::ok);
  CHECK(c->error().empty());
  CHECK(c->verify_result() == X509_V_OK);
  CHECK(server.sni() == "mail.test");
  CHECK(c->peer_not_after() > int64_t(std::time(nullptr)) + 29 * kDay);
}

TEST_CASE("tls: a self-signed certificate verifies against itself as the CA") {
  Key key = make_key();
  Cert cert = make_cert(key.get(), "mail.test", "DNS:mail.test", -kDay, kDay);
  PemFile ca({cert.get()});
  Server server(key.get(), cert.get());
  auto c = client(context(true, ca.path()), "mail.test");
  CHECK(run_handshake(*c, server) == TlsClient::Status::ok);
  CHECK(c->error().empty());
}

TEST_CASE("tls: IP addresses are checked against IP SANs and never sent as SNI") {
  Pki pki;
  Cert cert = pki.leaf("backend", "IP:127.0.0.1");
  PemFile ca({pki.ca.get()});
  {
    Server server(pki.key.get(), cert.get());
    auto c = client(context(true, ca.path()), "127.0.0.1", "127.0.0.1");
    CHECK(run_handshake(*c, server) == TlsClient::Status::ok);
    CHECK(server.sni().empty());
  }
  {
    Server server(pki.key.get(), cert.get());
    auto c = client(context(true, ca.path()), "127.0.0.2");
    CHECK(run_handshake(*c, server) == TlsClient::Status::error);
    CHECK(c->error() == "tls verify: IP address mismatch (depth 0, subject CN=backend, expected 127.0.0.2)");
  }
}

TEST_CASE("tls: verification fails on a wrong name") {
  Pki pki;
  Cert cert = pki.leaf("wrong.test", "DNS:wrong.test");
  PemFile ca({pki.ca.get()});
  Server server(pki.key.get(), cert.get());
  auto c = client(context(true, ca.path()), "mail.test");
  CHECK(run_handshake(*c, server) == TlsClient::Status::error);
  CHECK_FALSE(c->established());
  CHECK(c->verify_result() == X509_V_ERR_HOSTNAME_MISMATCH);
  CHECK(c->error() == "tls verify: hostname mismatch (depth 0, subject CN=wrong.test, expected mail.test)");
  CHECK(c->peer_not_after() == 0);
  // The failure is final, and nothing is left in OpenSSL's error queue.
  CHECK(c->handshake() == TlsClient::Status::error);
  CHECK(ERR_peek_error() == 0);
}

TEST_CASE("tls: partial wildcards are not accepted") {
  Pki pki;
  Cert cert = pki.leaf("wild", "DNS:m*.test");
  PemFile ca({pki.ca.get()});
  Server server(pki.key.get(), cert.get());
  auto c = client(context(true, ca.path()), "mail.test");
  CHECK(run_handshake(*c, server) == TlsClient::Status::error);
  CHECK(c->error().rfind("tls verify: hostname mismatch", 0) == 0);
}

TEST_CASE("tls: verification fails on an expired certificate") {
  Pki pki;
  Cert cert = pki.leaf("mail.test", "DNS:mail.test", -20 * kDay, -10 * kDay);
  PemFile ca({pki.ca.get()});
  Server server(pki.key.get(), cert.get());
  auto c = client(context(true, ca.path()), "mail.test");
  CHECK(run_handshake(*c, server) == TlsClient::Status::error);
  CHECK(c->verify_result() == X509_V_ERR_CERT_HAS_EXPIRED);
  CHECK(c->error() == "tls verify: certificate has expired (depth 0, subject CN=mail.test)");
  CHECK(ERR_peek_error() == 0);
}

TEST_CASE("tls: an expired certificate passes without verification, with its notAfter") {
  Pki pki;
  Cert cert = pki.leaf("mail.test", "DNS:mail.test", -20 * kDay, -10 * kDay);
  Server server(pki.key.get(), cert.get());
  auto c = client(context(false), "mail.test");
  CHECK(run_handshake(*c, server) == TlsClient::Status::ok);
  const int64_t expected = int64_t(std::time(nullptr)) - 10 * kDay;
  CHECK(c->peer_not_after() >= expected - 5);
  CHECK(c->peer_not_after() <= expected + 5);
}

TEST_CASE("tls: verification fails on an unknown CA") {
  Pki pki;
  Pki other("another CA");
  Cert cert = pki.leaf("mail.test", "DNS:mail.test");
  PemFile ca({other.ca.get()});
  Server server(pki.key.get(), cert.get());
  auto c = client(context(true, ca.path()), "mail.test");
  CHECK(run_handshake(*c, server) == TlsClient::Status::error);
  CHECK(c->error() == "tls verify: unable to get local issuer certificate (depth 0, subject CN=mail.test)");
}

TEST_CASE("tls: garbage instead of a ServerHello is a handshake error") {
  auto c = client(context(false), "mail.test");
  CHECK(c->handshake() == TlsClient::Status::want_read);
  CHECK(c->has_output());  // the ClientHello
  c->take_output();
  c->feed("500 what is this?\r\n");
  CHECK(c->handshake() == TlsClient::Status::error);
  CHECK(c->error().rfind("tls handshake: ", 0) == 0);
  CHECK(c->error().size() > 15);
  CHECK(ERR_peek_error() == 0);
}

TEST_CASE("tls: the end of the stream during the handshake is a handshake error") {
  auto c = client(context(false), "mail.test");
  CHECK(c->handshake() == TlsClient::Status::want_read);
  c->take_output();
  c->feed_eof();
  CHECK(c->handshake() == TlsClient::Status::error);
  CHECK(c->error() == "tls handshake: unexpected eof while reading");
  CHECK(ERR_peek_error() == 0);
}

TEST_CASE("tls: write before the handshake is refused") {
  auto c = client(context(false), "mail.test");
  CHECK(c->write("EHLO x\r\n") == TlsClient::Status::error);
  CHECK_FALSE(c->error().empty());
}

TEST_CASE("tls: an unusable CA file fails when the context is built") {
  char tmpl[] = "/tmp/smtplb-test-tls-XXXXXX";
  int fd = mkstemp(tmpl);
  REQUIRE(fd >= 0);
  REQUIRE(::write(fd, "not a certificate\n", 18) == 18);
  ::close(fd);
  std::string error;
  auto ctx = TlsContext::create(TlsContextOptions{true, tmpl}, error);
  ::unlink(tmpl);
  CHECK(ctx == nullptr);
  CHECK(error.rfind(std::string("tls setup: cannot load tls_ca_file ") + tmpl + ": ", 0) == 0);
  CHECK(ERR_peek_error() == 0);

  // Without verification no CA is needed; with it, an empty path means the system store.
  CHECK(TlsContext::create(TlsContextOptions{false, ""}, error) != nullptr);
  CHECK(TlsContext::create(TlsContextOptions{true, ""}, error) != nullptr);
}
