//! The `asg` backend: an Auto Scaling group made from a launch template, sized with
//! SetDesiredCapacity, for operators who want AWS to replace nodes that die. Scale-in picks
//! instances by the group's termination policy. The group and its template are named
//! `fleet-<name>` (or `asg.name`), and every instance carries the `fleet` tag.

use anyhow::{anyhow, Result};
use aws_sdk_autoscaling::types::{LaunchTemplateSpecification, LifecycleState, Tag as AsgTag};
use aws_sdk_ec2::types::{
    LaunchTemplateHttpTokensState, LaunchTemplateIamInstanceProfileSpecificationRequest,
    LaunchTemplateInstanceMetadataOptionsRequest, LaunchTemplateTagSpecificationRequest,
    RequestLaunchTemplateData, ResourceType, ShutdownBehavior, Tag,
};
use base64::Engine;
use indicatif::ProgressBar;

use super::ec2::{Ec2, FLEET_TAG};
use super::{Backend, NodeInfo};
use crate::aws::line;
use crate::config::Fleet;

pub struct Asg {
    fleet: Fleet,
    ec2: Ec2,
    group: String,
}

impl Asg {
    pub async fn new(fleet: &Fleet) -> Result<Asg> {
        let group = fleet
            .config
            .asg
            .name
            .clone()
            .unwrap_or_else(|| format!("fleet-{}", fleet.config.name));
        Ok(Asg {
            ec2: Ec2::new(fleet, "asg").await?,
            fleet: fleet.clone(),
            group,
        })
    }

    pub fn group(&self) -> &str {
        &self.group
    }

    async fn describe(&self) -> Result<Option<aws_sdk_autoscaling::types::AutoScalingGroup>> {
        let out = self
            .ec2
            .clients
            .asg
            .describe_auto_scaling_groups()
            .auto_scaling_group_names(&self.group)
            .send()
            .await
            .map_err(|e| line("DescribeAutoScalingGroups", &e))?;
        Ok(out.auto_scaling_groups().first().cloned())
    }

    async fn ensure_template(&self) -> Result<()> {
        let ec2 = &self.ec2.clients.ec2;
        let exists = ec2
            .describe_launch_templates()
            .launch_template_names(&self.group)
            .send()
            .await;
        if let Ok(o) = &exists {
            if !o.launch_templates().is_empty() {
                return Ok(());
            }
        }
        let cfg = &self.fleet.config.ec2;
        let user_data = super::user_data::render(&self.fleet, "asg")?;
        let mut data = RequestLaunchTemplateData::builder()
            .image_id(&cfg.ami)
            .instance_type(cfg.instance_types[0].as_str().into())
            .set_security_group_ids(
                (!cfg.security_groups.is_empty()).then(|| cfg.security_groups.clone()),
            )
            .set_key_name(cfg.key_name.clone())
            .user_data(base64::engine::general_purpose::STANDARD.encode(user_data))
            .instance_initiated_shutdown_behavior(ShutdownBehavior::Terminate)
            .metadata_options(
                LaunchTemplateInstanceMetadataOptionsRequest::builder()
                    .http_tokens(LaunchTemplateHttpTokensState::Required)
                    .build(),
            )
            .tag_specifications(
                LaunchTemplateTagSpecificationRequest::builder()
                    .resource_type(ResourceType::Instance)
                    .tags(
                        Tag::builder()
                            .key(FLEET_TAG)
                            .value(&self.fleet.config.name)
                            .build(),
                    )
                    .build(),
            );
        if let Some(p) = &cfg.instance_profile {
            let spec = LaunchTemplateIamInstanceProfileSpecificationRequest::builder();
            data = data.iam_instance_profile(if p.starts_with("arn:") {
                spec.arn(p).build()
            } else {
                spec.name(p).build()
            });
        }
        ec2.create_launch_template()
            .launch_template_name(&self.group)
            .launch_template_data(data.build())
            .send()
            .await
            .map_err(|e| line("CreateLaunchTemplate", &e))?;
        log!("created launch template {}", self.group);
        Ok(())
    }

    async fn ensure_group(&self) -> Result<()> {
        if self.describe().await?.is_some() {
            return Ok(());
        }
        let cfg = &self.fleet.config.ec2;
        self.ec2
            .clients
            .asg
            .create_auto_scaling_group()
            .auto_scaling_group_name(&self.group)
            .launch_template(
                LaunchTemplateSpecification::builder()
                    .launch_template_name(&self.group)
                    .version("$Latest")
                    .build(),
            )
            .min_size(0)
            .max_size(self.fleet.config.scale.max_nodes as i32)
            .desired_capacity(0)
            .vpc_zone_identifier(cfg.subnets.join(","))
            .tags(
                AsgTag::builder()
                    .key(FLEET_TAG)
                    .value(&self.fleet.config.name)
                    .propagate_at_launch(true)
                    .resource_id(&self.group)
                    .resource_type("auto-scaling-group")
                    .build(),
            )
            .send()
            .await
            .map_err(|e| line("CreateAutoScalingGroup", &e))?;
        log!("created Auto Scaling group {}", self.group);
        Ok(())
    }
}

fn live(state: Option<&LifecycleState>) -> bool {
    matches!(
        state,
        Some(
            LifecycleState::Pending
                | LifecycleState::PendingWait
                | LifecycleState::PendingProceed
                | LifecycleState::InService
        )
    )
}

impl Backend for Asg {
    fn name(&self) -> &'static str {
        "asg"
    }

    async fn observe(&self) -> Result<Vec<NodeInfo>> {
        let Some(g) = self.describe().await? else {
            return Ok(vec![]);
        };
        // Launch times and types from EC2, for the status table.
        let by_id: std::collections::HashMap<String, NodeInfo> = self
            .ec2
            .observe()
            .await?
            .into_iter()
            .map(|n| (n.id.clone(), n))
            .collect();
        let mut out: Vec<NodeInfo> = g
            .instances()
            .iter()
            .filter_map(|i| {
                let id = i.instance_id()?.to_string();
                let ec2 = by_id.get(&id);
                Some(NodeInfo {
                    state: i
                        .lifecycle_state()
                        .map(|s| s.as_str().to_string())
                        .unwrap_or_default(),
                    live: live(i.lifecycle_state()),
                    place: i.availability_zone().unwrap_or("").to_string(),
                    kind: i
                        .instance_type()
                        .map(str::to_string)
                        .or_else(|| ec2.map(|n| n.kind.clone()))
                        .unwrap_or_default(),
                    launched: ec2.map(|n| n.launched).unwrap_or(0),
                    id,
                })
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    async fn set_desired(&self, desired: usize) -> Result<bool> {
        if desired == 0 {
            // Scaling to nothing (or `down`) must work even when the AMI or subnets are gone,
            // and must not create a group just to empty it.
            self.ec2.check_region().await?;
            if self.describe().await?.is_none() {
                return Ok(true);
            }
        } else {
            self.ec2.preflight().await?;
            self.ensure_template().await?;
            self.ensure_group().await?;
            // A group made under a lower scale.max_nodes is raised to the current cap.
            let cap = self.fleet.config.scale.max_nodes as i32;
            if self
                .describe()
                .await?
                .and_then(|g| g.max_size())
                .is_some_and(|m| m < cap)
            {
                self.ec2
                    .clients
                    .asg
                    .update_auto_scaling_group()
                    .auto_scaling_group_name(&self.group)
                    .max_size(cap)
                    .send()
                    .await
                    .map_err(|e| line("UpdateAutoScalingGroup", &e))?;
            }
        }
        self.ec2
            .clients
            .asg
            .set_desired_capacity()
            .auto_scaling_group_name(&self.group)
            .desired_capacity(desired as i32)
            .honor_cooldown(false)
            .send()
            .await
            .map_err(|e| line("SetDesiredCapacity", &e))?;
        Ok(true)
    }

    async fn launch(&self, count: usize, _progress: &ProgressBar) -> Result<Vec<NodeInfo>> {
        let now = self.observe().await?.iter().filter(|n| n.live).count();
        self.set_desired(now + count).await?;
        Ok(vec![])
    }

    async fn terminate(&self, ids: &[String], progress: &ProgressBar) -> Result<()> {
        for (i, id) in ids.iter().enumerate() {
            self.ec2
                .clients
                .asg
                .terminate_instance_in_auto_scaling_group()
                .instance_id(id)
                .should_decrement_desired_capacity(true)
                .send()
                .await
                .map_err(|e| line("TerminateInstanceInAutoScalingGroup", &e))?;
            progress.set_position(i as u64 + 1);
        }
        Ok(())
    }

    async fn teardown(&self) -> Result<()> {
        if self.describe().await?.is_some() {
            self.ec2
                .clients
                .asg
                .delete_auto_scaling_group()
                .auto_scaling_group_name(&self.group)
                .force_delete(true)
                .send()
                .await
                .map_err(|e| line("DeleteAutoScalingGroup", &e))?;
            log!("deleted Auto Scaling group {}", self.group);
        }
        let ec2 = &self.ec2.clients.ec2;
        if ec2
            .describe_launch_templates()
            .launch_template_names(&self.group)
            .send()
            .await
            .is_ok_and(|o| !o.launch_templates().is_empty())
        {
            ec2.delete_launch_template()
                .launch_template_name(&self.group)
                .send()
                .await
                .map_err(|e| anyhow!("{}", line("DeleteLaunchTemplate", &e)))?;
        }
        Ok(())
    }
}
