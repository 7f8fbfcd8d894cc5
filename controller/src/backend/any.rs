//! Dispatch over the backends the CLI can name, so `fleet scale/down/status` run one code path.

use anyhow::Result;
use indicatif::ProgressBar;

use super::asg::Asg;
use super::ec2::Ec2;
use super::local::Local;
use super::{Backend, NodeInfo};

pub enum AnyBackend {
    Local(Box<Local>),
    Ec2(Box<Ec2>),
    Asg(Box<Asg>),
}

macro_rules! each {
    ($self:ident, $b:ident => $e:expr) => {
        match $self {
            AnyBackend::Local($b) => $e,
            AnyBackend::Ec2($b) => $e,
            AnyBackend::Asg($b) => $e,
        }
    };
}

impl Backend for AnyBackend {
    fn name(&self) -> &'static str {
        each!(self, b => b.name())
    }
    async fn recover(&self) -> Result<()> {
        each!(self, b => b.recover().await)
    }
    async fn observe(&self) -> Result<Vec<NodeInfo>> {
        each!(self, b => b.observe().await)
    }
    async fn launch(&self, count: usize, progress: &ProgressBar) -> Result<Vec<NodeInfo>> {
        each!(self, b => b.launch(count, progress).await)
    }
    async fn terminate(&self, ids: &[String], progress: &ProgressBar) -> Result<()> {
        each!(self, b => b.terminate(ids, progress).await)
    }
    async fn set_desired(&self, desired: usize) -> Result<bool> {
        each!(self, b => b.set_desired(desired).await)
    }
    async fn teardown(&self) -> Result<()> {
        each!(self, b => b.teardown().await)
    }
}
