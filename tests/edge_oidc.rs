//! OIDC JWTs as database passwords, through the real edge: keys made with openssl, a JWKS file,
//! tokens signed RS256 with openssl.

mod common;

use std::process::Command;

use anyhow::{bail, Result};
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use common::edge::{EdgeEnv, EnvOpts};

struct Idp {
    dir: tempfile::TempDir,
}

impl Idp {
    fn new() -> Result<Idp> {
        let dir = tempfile::tempdir()?;
        let key = dir.path().join("key.pem");
        let st = Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
            ])
            .arg(&key)
            .output()?;
        if !st.status.success() {
            bail!("openssl genpkey: {}", String::from_utf8_lossy(&st.stderr));
        }
        let out = Command::new("openssl")
            .args(["rsa", "-noout", "-modulus", "-in"])
            .arg(&key)
            .output()?;
        let hex = String::from_utf8_lossy(&out.stdout)
            .trim()
            .trim_start_matches("Modulus=")
            .to_string();
        let n: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        let jwks = serde_json::json!({ "keys": [ {
            "kty": "RSA", "kid": "k1", "use": "sig", "alg": "RS256",
            "n": B64.encode(&n), "e": "AQAB",
        } ] });
        std::fs::write(dir.path().join("jwks.json"), jwks.to_string())?;
        std::fs::write(
            dir.path().join("oidc.toml"),
            format!(
                "[oidc]\nissuer = \"https://idp.test\"\naudience = \"custos\"\njwks_file = \"{}\"\n",
                dir.path().join("jwks.json").display()
            ),
        )?;
        Ok(Idp { dir })
    }

    fn sign(&self, claims: serde_json::Value) -> Result<String> {
        let header = B64.encode(r#"{"alg":"RS256","typ":"JWT","kid":"k1"}"#);
        let payload = B64.encode(claims.to_string());
        let input = format!("{header}.{payload}");
        let msg = self.dir.path().join("msg");
        std::fs::write(&msg, &input)?;
        let out = Command::new("openssl")
            .args(["dgst", "-sha256", "-sign"])
            .arg(self.dir.path().join("key.pem"))
            .arg(&msg)
            .output()?;
        if !out.status.success() {
            bail!("openssl dgst: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(format!("{input}.{}", B64.encode(out.stdout)))
    }
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oidc_jwts_log_in_and_bad_ones_are_refused() -> Result<()> {
    let idp = Idp::new()?;
    let env = EdgeEnv::start(EnvOpts {
        extra_dev_args: vec![
            "--oidc".into(),
            idp.dir
                .path()
                .join("oidc.toml")
                .to_string_lossy()
                .into_owned(),
        ],
        ..Default::default()
    })?;
    let claims = |sub: &str, aud: &str, exp: i64| {
        serde_json::json!({ "iss": "https://idp.test", "aud": aud, "sub": sub, "exp": exp,
            "iat": now(), "groups": ["agents"] })
    };
    let good = idp.sign(claims("agent:oidc", "custos", now() + 600))?;
    let (code, out, err) = env.psql(&good, "agent:oidc", "SELECT email FROM users WHERE id = 1");
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("[REDACTED:email]"), "{out}");
    let (code, _, err) = env.psql(&good, "agent:oidc", "DROP TABLE canary");
    assert_ne!(code, 0);
    assert!(err.contains("no-drop-or-truncate"), "{err}");
    let expired = idp.sign(claims("agent:oidc", "custos", now() - 3600))?;
    let wrong_aud = idp.sign(claims("agent:oidc", "someone-else", now() + 600))?;
    let mut tampered_parts: Vec<String> = good.split('.').map(String::from).collect();
    tampered_parts[1] = B64.encode(claims("alice", "custos", now() + 600).to_string());
    let tampered = tampered_parts.join(".");
    let unsigned = format!(
        "{}.{}.",
        B64.encode(r#"{"alg":"none"}"#),
        B64.encode(claims("agent:oidc", "custos", now() + 600).to_string())
    );
    for (name, token, user, want) in [
        ("expired", &expired, "agent:oidc", "expired"),
        ("wrong audience", &wrong_aud, "agent:oidc", "audience"),
        ("tampered", &tampered, "alice", "signature"),
        ("unsigned", &unsigned, "agent:oidc", "unsigned"),
        (
            "subject mismatch",
            &good,
            "alice",
            "does not match the token's subject",
        ),
    ] {
        let (code, _, err) = env.psql(token, user, "SELECT 1");
        assert_ne!(code, 0, "{name} got in");
        assert!(
            err.contains("28P01") || err.contains("authentication failed"),
            "{name}: {err}"
        );
        assert!(err.to_lowercase().contains(want), "{name}: {err}");
        assert!(
            !err.contains(token.as_str()),
            "{name}: the token was echoed"
        );
    }
    // The session records how the identity logged in.
    let recs = env.audit(&["--identity", "agent:oidc", "--kind", "session_started"])?;
    assert!(recs.iter().any(
        |r| r["unmapped"]["custos"]["event"]["payload"]["session_started"]["auth_method"] == "oidc"
    ));
    Ok(())
}
