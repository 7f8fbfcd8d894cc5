//! `--backend`: which backend a command drives. The same command code runs on every one
//! (`backend::Backend`); only this choice differs.

use anyhow::Result;

use crate::backend::any::AnyBackend;
use crate::backend::local::Local;
use crate::config::Fleet;

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum BackendArg {
    /// Agents as processes on this machine.
    Local,
    /// EC2 instances launched with RunInstances, found by their `fleet` tag.
    Ec2,
    /// An Auto Scaling group sized with SetDesiredCapacity.
    Asg,
}

impl BackendArg {
    /// `--backend` if given, else `scale.backend` in fleet.toml, else `local`.
    pub fn pick(flag: Option<BackendArg>, fleet: &Fleet) -> BackendArg {
        flag.or(fleet.config.scale.backend)
            .unwrap_or(BackendArg::Local)
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet(extra: &str) -> Result<Fleet> {
        let t = format!("name = \"x\"\n[controller]\nlisten = \"127.0.0.1:8443\"\nurl = \"https://127.0.0.1:8443\"\ncert_names = [\"127.0.0.1\"]\n{extra}");
        Ok(Fleet {
            dir: "/f".into(),
            config: toml::from_str(&t)?,
        })
    }

    #[test]
    fn the_flag_beats_scale_backend_which_beats_local() {
        let plain = fleet("").unwrap();
        assert_eq!(BackendArg::pick(None, &plain), BackendArg::Local);
        let ec2 = fleet("[scale]\nbackend = \"ec2\"\n").unwrap();
        assert_eq!(BackendArg::pick(None, &ec2), BackendArg::Ec2);
        assert_eq!(
            BackendArg::pick(Some(BackendArg::Asg), &ec2),
            BackendArg::Asg
        );
        let e = fleet("[scale]\nbackend = \"gce\"\n").unwrap_err();
        assert!(e.to_string().contains("`local`, `ec2`"), "{e}");
    }
}
