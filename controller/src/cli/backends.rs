//! `--backend`: which backend a command drives. The same command code runs on every one
//! (`backend::Backend`); only this choice differs.

use anyhow::Result;

use crate::backend::any::AnyBackend;
use crate::backend::local::Local;
use crate::config::Fleet;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendArg {
    /// Agents as processes on this machine.
    Local,
    /// EC2 instances launched with RunInstances, found by their `fleet` tag.
    Ec2,
    /// An Auto Scaling group sized with SetDesiredCapacity.
    Asg,
}

impl BackendArg {
    /// The backend's name, as user-data and heartbeats carry it.
    pub fn name(self) -> &'static str {
        match self {
            BackendArg::Local => "local",
            BackendArg::Ec2 => "ec2",
            BackendArg::Asg => "asg",
        }
    }

    /// Makes the backend (AWS clients for `ec2` and `asg`).
    pub async fn build(self, fleet: &Fleet) -> Result<AnyBackend> {
        Ok(match self {
            BackendArg::Local => AnyBackend::Local(Box::new(Local::new(fleet))),
            BackendArg::Ec2 => {
                AnyBackend::Ec2(Box::new(crate::backend::ec2::Ec2::new(fleet, "ec2").await?))
            }
            BackendArg::Asg => {
                AnyBackend::Asg(Box::new(crate::backend::asg::Asg::new(fleet).await?))
            }
        })
    }
}
