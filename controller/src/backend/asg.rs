//! The `asg` backend: an Auto Scaling group made from a launch template, sized with
//! SetDesiredCapacity, for operators who want AWS to replace nodes that die. Scale-in picks
//! instances by the group's termination policy. The group and its template are named
//! `fleet-<name>` (or `asg.name`). The group, the template and every instance carry the
//! fleet's `fleet` and `fleet-id` tags; a group or template of that name without them belongs
//! to someone else and is never adopted, changed or deleted ([`super::owner::check_named`]).

use anyhow::{anyhow, bail, Result};
use aws_sdk_autoscaling::types::{
    AutoScalingGroup, LaunchTemplateSpecification, LifecycleState, Tag as AsgTag,
};
use aws_sdk_ec2::error::ProvideErrorMetadata;
use aws_sdk_ec2::types::{
    LaunchTemplateHttpTokensState, LaunchTemplateIamInstanceProfileSpecificationRequest,
    LaunchTemplateInstanceMetadataEndpointState, LaunchTemplateInstanceMetadataOptionsRequest,
    LaunchTemplateTagSpecificationRequest, RequestLaunchTemplateData, ResourceType,
    ShutdownBehavior, Tag, TagSpecification,
};
use base64::Engine;
use indicatif::ProgressBar;

use super::ec2::{Ec2, METADATA_HOP_LIMIT};
use super::owner::{check_named, foreign_line, refused_line, Named};
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

    async fn describe(&self) -> Result<Option<AutoScalingGroup>> {
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

    /// The group of our name, if there is one and it is ours; an error if it is someone else's.
    /// Every call that changes or deletes the group goes through this first.
    async fn owned_group(&self) -> Result<Option<AutoScalingGroup>> {
        let g = self.describe().await?;
        let tags = g.as_ref().map(|g| {
            g.tags()
                .iter()
                .filter_map(|t| Some((t.key()?, t.value().unwrap_or(""))))
        });
        match check_named(self.ec2.owner(), tags) {
            Named::Missing => Ok(None),
            Named::Ours => Ok(g),
            Named::Foreign(why) => bail!(foreign_line(
                "Auto Scaling group",
                &self.group,
                &why,
                self.ec2.owner()
            )),
        }
    }

    /// Whether the launch template of our name exists and is ours; an error if it is someone
    /// else's. Every call that deletes the template goes through this first.
    async fn owned_template(&self) -> Result<bool> {
        let out = self
            .ec2
            .clients
            .ec2
            .describe_launch_templates()
            .launch_template_names(&self.group)
            .send()
            .await;
        let found = match &out {
            Ok(o) => o.launch_templates().first(),
            Err(e)
                if e.code()
                    .is_some_and(|c| c.starts_with("InvalidLaunchTemplateName.NotFound")) =>
            {
                None
            }
            Err(e) => return Err(line("DescribeLaunchTemplates", e)),
        };
        let tags = found.map(|t| {
            t.tags()
                .iter()
                .filter_map(|t| Some((t.key()?, t.value().unwrap_or(""))))
        });
        match check_named(self.ec2.owner(), tags) {
            Named::Missing => Ok(false),
            Named::Ours => Ok(true),
            Named::Foreign(why) => bail!(foreign_line(
                "launch template",
                &self.group,
                &why,
                self.ec2.owner()
            )),
        }
    }

    async fn ensure_template(&self) -> Result<()> {
        if self.owned_template().await? {
            return Ok(());
        }
        let ec2 = &self.ec2.clients.ec2;
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
                    .http_endpoint(LaunchTemplateInstanceMetadataEndpointState::Enabled)
                    .http_tokens(LaunchTemplateHttpTokensState::Required)
                    .http_put_response_hop_limit(METADATA_HOP_LIMIT)
                    .build(),
            );
        let mut on_instances =
            LaunchTemplateTagSpecificationRequest::builder().resource_type(ResourceType::Instance);
        let mut on_template =
            TagSpecification::builder().resource_type(ResourceType::LaunchTemplate);
        for (k, v) in self.ec2.owner().tags() {
            on_instances = on_instances.tags(Tag::builder().key(k).value(v).build());
            on_template = on_template.tags(Tag::builder().key(k).value(v).build());
        }
        data = data.tag_specifications(on_instances.build());
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
            .tag_specifications(on_template.build())
            .send()
            .await
            .map_err(|e| line("CreateLaunchTemplate", &e))?;
        log!("created launch template {}", self.group);
        Ok(())
    }

    async fn ensure_group(&self) -> Result<()> {
        if self.owned_group().await?.is_some() {
            return Ok(());
        }
        let cfg = &self.fleet.config.ec2;
        let tags = self
            .ec2
            .owner()
            .tags()
            .iter()
            .map(|(k, v)| {
                AsgTag::builder()
                    .key(*k)
                    .value(*v)
                    .propagate_at_launch(true)
                    .resource_id(&self.group)
                    .resource_type("auto-scaling-group")
                    .build()
            })
            .collect();
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
            .set_tags(Some(tags))
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
        let Some(g) = self.owned_group().await? else {
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
                    stopped: false,
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
            // and must not create a group just to empty it. A template of our name that is
            // someone else's stops `down` here, before anything is changed.
            self.ec2.check_region().await?;
            self.owned_template().await?;
            if self.owned_group().await?.is_none() {
                return Ok(true);
            }
        } else {
            self.ec2.preflight().await?;
            self.ensure_template().await?;
            self.ensure_group().await?;
            // A group made under a lower scale.max_nodes is raised to the current cap.
            let cap = self.fleet.config.scale.max_nodes as i32;
            if self
                .owned_group()
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
        if self.owned_group().await?.is_none() {
            bail!(
                "Auto Scaling group {} does not exist; nothing to terminate in it",
                self.group
            );
        }
        let checked = self.ec2.recheck(ids).await?;
        for (i, id) in checked.ours.iter().enumerate() {
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
        if !checked.refused.is_empty() {
            bail!(refused_line("instances", &checked.refused));
        }
        Ok(())
    }

    async fn teardown(&self) -> Result<()> {
        // Both checked before either is deleted.
        let group = self.owned_group().await?;
        let template = self.owned_template().await?;
        if group.is_some() {
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
        if template {
            self.ec2
                .clients
                .ec2
                .delete_launch_template()
                .launch_template_name(&self.group)
                .send()
                .await
                .map_err(|e| anyhow!("{}", line("DeleteLaunchTemplate", &e)))?;
        }
        Ok(())
    }
}
