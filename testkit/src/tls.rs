//! Certificates for TLS tests, made with the `openssl` command line tool.

use std::path::Path;
use std::process::Command;

fn openssl(dir: &Path, args: &[&str]) -> bool {
    Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// `<name>.pem` / `<name>.key` in `dir`: a self-signed CA.
fn make_ca(dir: &Path, name: &str) -> bool {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
            "-days",
            "2",
            "-subj",
            &format!("/CN=busway test {name}"),
        ],
    )
}

/// Writes into `dir` a CA (`ca.pem`, `ca.key`), a server certificate for 127.0.0.1 and
/// localhost signed by it (`server.pem`, `server.key`) and an unrelated CA (`other-ca.pem`,
/// for refusals); false when openssl is unavailable or fails.
pub fn make_certs(dir: &Path) -> bool {
    if std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n",
    )
    .is_err()
    {
        return false;
    }
    make_ca(dir, "ca")
        && make_ca(dir, "other-ca")
        && openssl(
            dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=127.0.0.1",
            ],
        )
        && openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "server.pem",
                "-days",
                "2",
                "-extfile",
                "san.ext",
            ],
        )
}
