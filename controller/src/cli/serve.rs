//! `fleet serve`: a thin call into the daemon, which runs until Ctrl-C or SIGTERM, or until one
//! of its tasks ends unexpectedly (an error).

use anyhow::Result;

use crate::config::Fleet;

pub async fn run(fleet: &Fleet) -> Result<()> {
    crate::daemon::serve(fleet).await
}
