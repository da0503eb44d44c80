//! The operator credential file: one `name:PHC-string` line per operator (Argon2id hashes),
//! comments with `#`. Read only by the `auth` worker; written by `airlock-hmi user add` and by
//! `auth` itself on first start. Pure parsing and hashing: the callers do the I/O.

use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::Argon2;

/// The file's name inside the `auth` worker's state directory.
pub const FILE_NAME: &str = "operators";

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CredentialError {
    #[error("line {line}: {why}")]
    Malformed { line: usize, why: String },
    #[error("operator name {0:?} must be 1-32 ASCII letters, digits, '.', '_' or '-'")]
    BadName(String),
    #[error("password must be 8 to 256 bytes")]
    BadPassword,
    #[error("hashing: {0}")]
    Hash(String),
}

/// One operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operator {
    pub name: String,
    /// The PHC string (`$argon2id$v=19$...`).
    pub hash: String,
}

pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// Parses the file; every malformed line is an error (an auth layer must not guess).
pub fn parse(text: &str) -> Result<Vec<Operator>, CredentialError> {
    let mut out: Vec<Operator> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        let l = line.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let Some((name, hash)) = l.split_once(':') else {
            return Err(CredentialError::Malformed { line: line_no, why: "expected NAME:HASH".into() });
        };
        if !valid_name(name) {
            return Err(CredentialError::Malformed { line: line_no, why: format!("bad operator name {name:?}") });
        }
        if PasswordHash::new(hash).is_err() || !hash.starts_with("$argon2id$") {
            return Err(CredentialError::Malformed { line: line_no, why: "not an Argon2id PHC string".into() });
        }
        if out.iter().any(|o| o.name == name) {
            return Err(CredentialError::Malformed { line: line_no, why: format!("operator {name} listed twice") });
        }
        out.push(Operator { name: name.into(), hash: hash.into() });
    }
    Ok(out)
}

/// The file's text for `ops`.
pub fn render(ops: &[Operator]) -> String {
    let mut s = String::from("# airlock operators: NAME:ARGON2ID-PHC-HASH (managed by `airlock-hmi user add`)\n");
    for o in ops {
        s.push_str(&format!("{}:{}\n", o.name, o.hash));
    }
    s
}

/// Hashes `password` with Argon2id (default parameters, random salt).
pub fn hash(password: &str) -> Result<String, CredentialError> {
    if password.len() < 8 || password.len() > 256 {
        return Err(CredentialError::BadPassword);
    }
    Argon2::default()
        .hash_password(password.as_bytes())
        .map(|h| h.to_string())
        .map_err(|e| CredentialError::Hash(e.to_string()))
}

/// Adds or replaces operator `name`.
pub fn set(ops: &mut Vec<Operator>, name: &str, password: &str) -> Result<(), CredentialError> {
    if !valid_name(name) {
        return Err(CredentialError::BadName(name.into()));
    }
    let hash = hash(password)?;
    match ops.iter_mut().find(|o| o.name == name) {
        Some(o) => o.hash = hash,
        None => ops.push(Operator { name: name.into(), hash }),
    }
    Ok(())
}

/// True if `password` is `op`'s.
pub fn verify(op: &Operator, password: &str) -> bool {
    match PasswordHash::new(&op.hash) {
        Ok(h) => Argon2::default().verify_password(password.as_bytes(), &h).is_ok(),
        Err(_) => false,
    }
}

/// A random password of 20 characters from an unambiguous alphabet (~115 bits).
pub fn random_password() -> std::io::Result<String> {
    const ALPHABET: &[u8] = b"abcdefghjkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let mut out = String::new();
    let mut buf = [0u8; 64];
    while out.len() < 20 {
        getrandom::getrandom(&mut buf).map_err(|e| std::io::Error::other(e.to_string()))?;
        for b in buf {
            // Rejection sampling keeps the choice uniform.
            if usize::from(b) < 256 - 256 % ALPHABET.len() && out.len() < 20 {
                out.push(char::from(ALPHABET[usize::from(b) % ALPHABET.len()]));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_set_password_verifies_and_a_wrong_one_does_not() {
        let mut ops = Vec::new();
        set(&mut ops, "alice", "correct horse").expect("set");
        let text = render(&ops);
        let back = parse(&text).expect("parse");
        assert_eq!(back, ops);
        assert!(verify(&back[0], "correct horse"));
        assert!(!verify(&back[0], "correct horsf"));
        assert!(matches!(set(&mut ops, "a:b", "correct horse"), Err(CredentialError::BadName(_))));
        assert!(matches!(set(&mut ops, "bob", "short"), Err(CredentialError::BadPassword)));
    }

    #[test]
    fn malformed_files_are_refused_with_their_line() {
        let e = parse("# c\n\nalice:plaintext\n").expect_err("plaintext");
        assert!(e.to_string().starts_with("line 3:"), "{e}");
        assert!(parse("nocolon\n").is_err());
        let p = random_password().expect("rng");
        assert_eq!(p.len(), 20);
        assert_ne!(p, random_password().expect("rng"));
    }
}
