//! Users of the admin site: Argon2id password hashes and roles, in table `app_user`.
//!
//! Emails are unique whatever their case (`lower(email)` is indexed unique) and kept as typed.
//! `ROLE_ADMIN` reaches the admin site; any other role only logs in.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Argon2, password_hash::rand_core::OsRng};
use std::sync::OnceLock;
use thiserror::Error;

/// The role that reaches the admin pages and server functions.
pub const ROLE_ADMIN: &str = "ROLE_ADMIN";

/// Shortest password `user add` and `user passwd` accept.
pub const MIN_PASSWORD_LEN: usize = 8;

/// A user as the site sees it.
#[derive(Clone, PartialEq, Eq)]
pub struct User {
    pub id: i64,
    pub email: String,
    pub roles: Vec<String>,
    /// The Argon2 PHC string; also the session's auth hash, so changing the password ends the
    /// user's other sessions.
    pub password_hash: String,
}

impl std::fmt::Debug for User {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("User")
            .field("id", &self.id)
            .field("email", &self.email)
            .field("roles", &self.roles)
            .finish_non_exhaustive()
    }
}

impl User {
    pub fn is_admin(&self) -> bool {
        self.roles.iter().any(|r| r == ROLE_ADMIN)
    }
}

#[derive(Debug, Error)]
pub enum UserError {
    #[error("a user with email {0} already exists")]
    Exists(String),
    #[error("no user with email {0}")]
    NotFound(String),
    #[error("{0:?} is not an email address")]
    BadEmail(String),
    #[error("the password is too short (at least {MIN_PASSWORD_LEN} characters)")]
    ShortPassword,
    #[error("hashing the password: {0}")]
    Hash(String),
    #[error(transparent)]
    Db(#[from] tokio_postgres::Error),
}

fn argon2() -> Argon2<'static> {
    // Argon2id with the crate's defaults (19 MiB, 2 passes, 1 lane: OWASP's minimum).
    Argon2::default()
}

/// Hashes `password` into an Argon2id PHC string with a fresh salt.
pub fn hash_password(password: &str) -> Result<String, UserError> {
    let salt = SaltString::generate(&mut OsRng);
    argon2()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| UserError::Hash(e.to_string()))
}

/// True when `password` matches `hash`. A malformed hash never matches.
pub fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash)
        .map(|parsed| {
            argon2()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok()
        })
        .unwrap_or(false)
}

/// Spends the time of one verification, for logins naming no user (so that timing does not
/// tell which emails exist).
pub fn verify_nothing(password: &str) {
    static DUMMY: OnceLock<String> = OnceLock::new();
    let hash = DUMMY.get_or_init(|| hash_password("not a password").unwrap_or_default());
    let _ = verify_password(password, hash);
}

fn check_email(email: &str) -> Result<String, UserError> {
    let email = email.trim();
    let valid = email.len() <= 254
        && email
            .split_once('@')
            .is_some_and(|(local, domain)| !local.is_empty() && !domain.is_empty())
        && !email.chars().any(char::is_whitespace);
    if valid {
        Ok(email.to_owned())
    } else {
        Err(UserError::BadEmail(email.to_owned()))
    }
}

fn check_password(password: &str) -> Result<(), UserError> {
    if password.chars().count() < MIN_PASSWORD_LEN {
        return Err(UserError::ShortPassword);
    }
    Ok(())
}

fn from_row(row: &tokio_postgres::Row) -> User {
    User {
        id: row.get("id"),
        email: row.get("email"),
        roles: row.get("roles"),
        password_hash: row.get("password_hash"),
    }
}

const COLUMNS: &str = "id, email, roles, password_hash";

/// Creates a user with `roles`.
pub async fn create(
    db: &tokio_postgres::Client,
    email: &str,
    password: &str,
    roles: &[String],
) -> Result<User, UserError> {
    let email = check_email(email)?;
    check_password(password)?;
    let hash = hash_password(password)?;
    let sql = format!(
        "INSERT INTO app_user (email, password_hash, roles) VALUES ($1, $2, $3) RETURNING {COLUMNS}"
    );
    match db.query_one(&sql, &[&email, &hash, &roles]).await {
        Ok(row) => Ok(from_row(&row)),
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => {
            Err(UserError::Exists(email))
        }
        Err(e) => Err(e.into()),
    }
}

/// Sets a new password.
pub async fn set_password(
    db: &tokio_postgres::Client,
    email: &str,
    password: &str,
) -> Result<(), UserError> {
    check_password(password)?;
    let hash = hash_password(password)?;
    let n = db
        .execute(
            "UPDATE app_user SET password_hash = $2, updated_at = now() WHERE lower(email) = lower($1)",
            &[&email.trim(), &hash],
        )
        .await?;
    if n == 0 {
        return Err(UserError::NotFound(email.trim().to_owned()));
    }
    Ok(())
}

/// Every user, by email.
pub async fn list(db: &tokio_postgres::Client) -> Result<Vec<User>, UserError> {
    let sql = format!("SELECT {COLUMNS} FROM app_user ORDER BY lower(email)");
    Ok(db.query(&sql, &[]).await?.iter().map(from_row).collect())
}

pub async fn by_email(db: &tokio_postgres::Client, email: &str) -> Result<Option<User>, UserError> {
    let sql = format!("SELECT {COLUMNS} FROM app_user WHERE lower(email) = lower($1)");
    Ok(db
        .query_opt(&sql, &[&email.trim()])
        .await?
        .as_ref()
        .map(from_row))
}

pub async fn by_id(db: &tokio_postgres::Client, id: i64) -> Result<Option<User>, UserError> {
    let sql = format!("SELECT {COLUMNS} FROM app_user WHERE id = $1");
    Ok(db.query_opt(&sql, &[&id]).await?.as_ref().map(from_row))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_argon2id_salted_and_verify() {
        let a = hash_password("correct horse").unwrap();
        let b = hash_password("correct horse").unwrap();
        assert!(a.starts_with("$argon2id$"), "{a}");
        assert_ne!(a, b, "salted");
        assert!(verify_password("correct horse", &a));
        assert!(!verify_password("wrong horse", &a));
        assert!(!verify_password("correct horse", "not a hash"));
    }

    #[test]
    fn emails_and_passwords_are_checked() {
        assert_eq!(check_email(" a@b.c ").unwrap(), "a@b.c");
        for bad in ["", "a", "@b", "a@", "a b@c"] {
            assert!(check_email(bad).is_err(), "{bad}");
        }
        assert!(check_password("short").is_err());
        assert!(check_password("long enough").is_ok());
    }
}
