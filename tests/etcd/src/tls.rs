//! Certificates for etcd over TLS in tests: a CA, a server certificate for 127.0.0.1 and a
//! client certificate, made with the `openssl` program in a temporary directory, and the
//! member flags that serve clients with them.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use tempfile::TempDir;

use crate::Options;

/// What the server certificate may do and whom it names: webpki (rustls) wants an
/// end-entity certificate with the address in its subject alternative names.
const SERVER_EXT: &str = "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth,clientAuth
subjectAltName=IP:127.0.0.1,DNS:localhost
";

/// What the client certificate may do: etcd's `--client-cert-auth` wants `clientAuth`.
const CLIENT_EXT: &str = "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth
subjectAltName=DNS:vipam-test-client
";

/// A test CA and the certificates it signed, as PEM files in a temporary directory that goes
/// with the value.
pub struct Certificates {
    dir: TempDir,
}

impl Certificates {
    /// Makes a CA, a server certificate (for `127.0.0.1` and `localhost`) and a client
    /// certificate with the `openssl` program at `openssl`; `Err` with openssl's output when a
    /// step fails.
    pub fn generate(openssl: &Path) -> Result<Certificates, String> {
        let dir = tempfile::Builder::new()
            .prefix("vipam-etcd-tls-")
            .tempdir()
            .map_err(|e| format!("a temporary directory for certificates: {e}"))?;
        let certs = Certificates { dir };
        let at = |name: &str| certs.dir.path().join(name).into_os_string();
        let ec = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1";
        run(
            openssl,
            words(&format!("req -x509 -nodes -days 2 {ec}"))
                .chain([
                    "-keyout".into(),
                    at("ca.key"),
                    "-out".into(),
                    at("ca.crt"),
                    "-subj".into(),
                    "/CN=vipam test CA".into(),
                    "-addext".into(),
                    "basicConstraints=critical,CA:TRUE".into(),
                    "-addext".into(),
                    "keyUsage=critical,keyCertSign,cRLSign".into(),
                ])
                .collect(),
        )?;
        for (name, ext, serial) in [("server", SERVER_EXT, "2"), ("client", CLIENT_EXT, "3")] {
            let ext_file = certs.dir.path().join(format!("{name}.ext"));
            std::fs::write(&ext_file, ext)
                .map_err(|e| format!("write {}: {e}", ext_file.display()))?;
            run(
                openssl,
                words(&format!("req -new -nodes {ec}"))
                    .chain([
                        "-keyout".into(),
                        at(&format!("{name}.key")),
                        "-out".into(),
                        at(&format!("{name}.csr")),
                        "-subj".into(),
                        format!("/CN=vipam test {name}").into(),
                    ])
                    .collect(),
            )?;
            run(
                openssl,
                words(&format!("x509 -req -days 2 -set_serial {serial}"))
                    .chain([
                        "-in".into(),
                        at(&format!("{name}.csr")),
                        "-CA".into(),
                        at("ca.crt"),
                        "-CAkey".into(),
                        at("ca.key"),
                        "-extfile".into(),
                        ext_file.into_os_string(),
                        "-out".into(),
                        at(&format!("{name}.crt")),
                    ])
                    .collect(),
            )?;
        }
        Ok(certs)
    }

    /// The CA certificate that signed the others.
    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    /// The server certificate.
    pub fn server_cert(&self) -> PathBuf {
        self.dir.path().join("server.crt")
    }

    /// The server certificate's key.
    pub fn server_key(&self) -> PathBuf {
        self.dir.path().join("server.key")
    }

    /// The client certificate.
    pub fn client_cert(&self) -> PathBuf {
        self.dir.path().join("client.crt")
    }

    /// The client certificate's key.
    pub fn client_key(&self) -> PathBuf {
        self.dir.path().join("client.key")
    }

    /// Options for members that serve clients over TLS with the server certificate and admit
    /// only clients with a certificate of this CA.
    pub fn server_options(&self) -> Options {
        let flag = |name: &str, path: PathBuf| [OsString::from(name), path.into_os_string()];
        Options {
            client_tls: true,
            args: [
                flag("--cert-file", self.server_cert()),
                flag("--key-file", self.server_key()),
                flag("--trusted-ca-file", self.ca()),
            ]
            .into_iter()
            .flatten()
            .chain([OsString::from("--client-cert-auth")])
            .collect(),
        }
    }
}

/// The words of `text` as arguments.
fn words(text: &str) -> impl Iterator<Item = OsString> + '_ {
    text.split_whitespace().map(OsString::from)
}

/// Runs `openssl {args}`; `Err` with its output when it fails.
fn run(openssl: &Path, args: Vec<OsString>) -> Result<(), String> {
    let out = Command::new(openssl)
        .args(&args)
        .output()
        .map_err(|e| format!("run {}: {e}", openssl.display()))?;
    if out.status.success() {
        return Ok(());
    }
    Err(format!(
        "openssl {args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}
