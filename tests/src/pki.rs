//! A scratch PKI for TLS tests, made with Debian's `openssl` command line (scripts/test.sh
//! installs it): a CA and certificates it signs, EC P-256 keys, X.509 v3, in a temporary
//! directory that goes with the value.

use std::path::PathBuf;
use std::process::Command;

/// A scratch PKI made with the `openssl` command line: EC P-256 keys, X.509 v3.
pub struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    pub fn new() -> Pki {
        Pki {
            dir: tempfile::Builder::new()
                .prefix("waystation-pki-")
                .tempdir()
                .expect("tempdir"),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn openssl(&self, args: &[&str]) {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .expect("run openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `<name>.crt` and `<name>.key`: a self-signed CA.
    pub fn ca(&self, name: &str) {
        self.openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.crt"),
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
    }

    /// `<name>.crt` and `<name>.key` signed by CA `ca`: a server certificate for 127.0.0.1
    /// and localhost, or a client certificate with subject CN `cn`.
    pub fn leaf(&self, name: &str, ca: &str, cn: &str, server: bool) {
        self.openssl(&[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            &format!("/O=Waystation tests/CN={cn}"),
        ]);
        let ext = if server {
            "basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"
        } else {
            "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n"
        };
        std::fs::write(self.path(&format!("{name}.ext")), ext).expect("write extension file");
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.crt"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-out",
            &format!("{name}.crt"),
            "-days",
            "2",
            "-extfile",
            &format!("{name}.ext"),
        ]);
    }

    pub fn crt(&self, name: &str) -> String {
        self.path(&format!("{name}.crt")).display().to_string()
    }

    pub fn key(&self, name: &str) -> String {
        self.path(&format!("{name}.key")).display().to_string()
    }
}

impl Default for Pki {
    fn default() -> Pki {
        Pki::new()
    }
}
