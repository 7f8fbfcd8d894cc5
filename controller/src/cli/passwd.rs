//! `fleet passwd`: a new web UI password, shown once; only its hash is stored.

use std::fmt;

use anyhow::Result;
use serde::Serialize;

use super::init::set_password;
use crate::config::Fleet;
use crate::daemon::UI_USER;

/// The new password (the only time it is seen).
#[derive(Debug, Serialize)]
pub struct NewPassword {
    pub user: &'static str,
    pub password: String,
}

impl fmt::Display for NewPassword {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "web UI user: {}  password: {}", self.user, self.password)?;
        write!(f, "restart `fleet serve` to use it")
    }
}

pub fn run(fleet: &Fleet) -> Result<NewPassword> {
    Ok(NewPassword {
        user: UI_USER,
        password: set_password(fleet)?,
    })
}
