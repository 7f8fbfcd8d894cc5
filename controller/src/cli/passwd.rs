//! `fleet passwd`: a new web UI password, shown once; only its hash is stored. The running
//! controller is told to reload, so the new password works at once and the old one no longer
//! does.

use std::fmt;

use anyhow::Result;
use serde::Serialize;

use super::init::set_password;
use super::token::{tell_controller, Told};
use crate::config::Fleet;
use crate::daemon::UI_USER;

/// The new password (the only time it is seen).
#[derive(Debug, Serialize)]
pub struct NewPassword {
    pub user: &'static str,
    pub password: String,
    /// What the running controller made of it.
    pub controller: Told,
}

impl fmt::Display for NewPassword {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "web UI user: {}  password: {}", self.user, self.password)?;
        writeln!(f, "{}", self.controller)?;
        write!(
            f,
            "behind nginx, render its htpasswd again: fleet nginx --password-stdin"
        )
    }
}

pub async fn run(fleet: &Fleet) -> Result<NewPassword> {
    let password = set_password(fleet)?;
    Ok(NewPassword {
        user: UI_USER,
        password,
        controller: tell_controller(fleet).await,
    })
}
