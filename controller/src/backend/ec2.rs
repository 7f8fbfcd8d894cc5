//! The `ec2` backend: instances launched with RunInstances, found again by their `fleet` and
//! `fleet-id` tags ([`super::owner`]): listed by both, re-checked exactly in code, and re-checked
//! once more, one by one, right before TerminateInstances.
//!
//! Launching is paced by client-side buckets shaped on EC2's documented limits
//! ([`super::launcher`]); each RunInstances asks for as many instances as the budget allows,
//! spread over the subnets, with MinCount 1 so a partial fulfilment is taken and the rest goes
//! elsewhere. Every call carries an idempotency token that is journaled before the call, so a
//! retry (ours, the SDK's, or the next `fleet scale` after a crash) never launches twice.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use aws_sdk_ec2::types::{
    Filter, HttpTokensState, IamInstanceProfileSpecification, InstanceInterruptionBehavior,
    InstanceMarketOptionsRequest, InstanceMetadataEndpointState, InstanceMetadataOptionsRequest,
    InstanceType, MarketType, ResourceType, ShutdownBehavior, SpotInstanceType, SpotMarketOptions,
    Tag, TagSpecification,
};
use base64::Engine;
use indicatif::ProgressBar;
use serde::{Deserialize, Serialize};

use super::launcher::{next_batch, Limits, Pools, Step};
use super::owner::{check_targets, refused_line, Checked, Owner, Seen};
use super::{Backend, NodeInfo};
use crate::aws::{classify, line, Clients, Failure};
use crate::config::Fleet;

/// IMDS answers PUTs (the IMDSv2 token) only this many network hops away. The agent runs on
/// the instance itself, one hop; anything behind a further hop (a container on a bridge
/// network, a forwarded request) gets no token, so no instance-role credentials (docs/ec2.md).
pub const METADATA_HOP_LIMIT: i32 = 1;
/// Most values one DescribeInstances filter takes.
const FILTER_VALUES: usize = 200;
/// Waits on our own buckets are capped so progress is reported while waiting.
const MAX_SLEEP: Duration = Duration::from_secs(2);
/// Delays before retrying a transient failure (network, 5xx): doubled up to the cap.
const TRANSIENT_INITIAL: Duration = Duration::from_millis(500);
const TRANSIENT_MAX: Duration = Duration::from_secs(10);
/// Transient failures in a row before giving up.
const TRANSIENT_LIMIT: u32 = 8;
/// Throttled answers in a row before the launcher gives up (each one halves its pace first).
const THROTTLE_LIMIT: u32 = 30;
/// Quiet time the launcher waits for to gather a useful batch once the bucket is drained.
const MIN_BATCH_WINDOW: Duration = Duration::from_millis(500);

/// A RunInstances call recorded before it is made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inflight {
    pub token: String,
    pub subnet: String,
    pub instance_type: String,
    pub count: usize,
}

pub struct Ec2 {
    fleet: Fleet,
    owner: Owner,
    pub clients: Clients,
    region_checked: tokio::sync::OnceCell<()>,
    limits: Mutex<Limits>,
    journal: PathBuf,
    user_data: String,
    backend_name: &'static str,
}

/// Filters that narrow a listing to this fleet's tags. Only a narrowing: the values are
/// validated names and ids, but EC2 reads `*` and `?` in them as wildcards, so every instance
/// listed is checked again with [`Owner::owns`].
fn owner_filters(owner: &Owner) -> Vec<Filter> {
    owner
        .tags()
        .iter()
        .map(|(k, v)| {
            Filter::builder()
                .name(format!("tag:{k}"))
                .values(*v)
                .build()
        })
        .collect()
}

/// IMDSv2 only, with an explicit hop limit ([`METADATA_HOP_LIMIT`]).
fn metadata_options() -> InstanceMetadataOptionsRequest {
    InstanceMetadataOptionsRequest::builder()
        .http_endpoint(InstanceMetadataEndpointState::Enabled)
        .http_tokens(HttpTokensState::Required)
        .http_put_response_hop_limit(METADATA_HOP_LIMIT)
        .build()
}

fn tags_of(i: &aws_sdk_ec2::types::Instance) -> impl Iterator<Item = (&str, &str)> {
    i.tags()
        .iter()
        .filter_map(|t| Some((t.key()?, t.value().unwrap_or(""))))
}

fn new_token() -> String {
    // ClientToken: up to 64 ASCII characters.
    format!("fleet-{}", fleet_common::secret::random_token(18))
}

impl Ec2 {
    pub async fn new(fleet: &Fleet, backend_name: &'static str) -> Result<Ec2> {
        let cfg = &fleet.config.ec2;
        let owner = Owner {
            name: fleet.config.name.clone(),
            id: fleet.ensure_id()?,
        };
        let clients = crate::aws::clients(cfg).await?;
        Ok(Ec2 {
            owner,
            region_checked: tokio::sync::OnceCell::new(),
            limits: Mutex::new(Limits::documented(cfg.time_scale, Instant::now())),
            journal: fleet.state_dir().join("ec2-inflight.json"),
            user_data: super::user_data::render(fleet, backend_name)?,
            fleet: fleet.clone(),
            clients,
            backend_name,
        })
    }

    fn name(&self) -> &str {
        &self.fleet.config.name
    }

    /// This fleet's name and id, as its resources are tagged.
    pub fn owner(&self) -> &Owner {
        &self.owner
    }

    fn read_journal(&self) -> Vec<Inflight> {
        std::fs::read(&self.journal)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn write_journal(&self, j: &[Inflight]) -> Result<()> {
        if let Some(p) = self.journal.parent() {
            std::fs::create_dir_all(p)?;
        }
        let tmp = self.journal.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(j)?)?;
        std::fs::rename(&tmp, &self.journal).context("cannot write the launch journal")?;
        Ok(())
    }

    async fn sleep_on_describe(&self) {
        let wait = {
            let mut l = self.limits.lock().unwrap();
            let now = Instant::now();
            let w = l.describe.wait_for(1.0, now);
            l.describe.take(1.0, now + w);
            w
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }

    /// Everything checked before anything is launched: region, AMI, subnets, security groups,
    /// instance types. Returns the subnets with their AZs, in configured order.
    pub async fn preflight(&self) -> Result<Vec<(String, String)>> {
        let cfg = &self.fleet.config.ec2;
        let ec2 = &self.clients.ec2;
        if cfg.ami.is_empty() {
            bail!("ec2.ami is not set in fleet.toml; build one with packer/ (docs/ami.md)");
        }
        if cfg.subnets.is_empty() {
            bail!("ec2.subnets is empty in fleet.toml; name at least one subnet");
        }
        if cfg.instance_types.is_empty() {
            bail!("ec2.instance_types is empty in fleet.toml; name at least one type");
        }
        self.check_region().await?;
        let images = ec2.describe_images().image_ids(&cfg.ami).send().await;
        match images {
            Ok(o) if !o.images().is_empty() => {}
            Ok(_) => bail!(
                "AMI {} does not exist in {}; check ec2.ami (docs/ami.md)",
                cfg.ami,
                self.clients.region
            ),
            Err(e) => match e
                .as_service_error()
                .map(|s| aws_sdk_ec2::error::ProvideErrorMetadata::code(s))
            {
                Some(Some(c)) if c.starts_with("InvalidAMIID") => {
                    bail!(
                        "AMI {} does not exist in {}; check ec2.ami (docs/ami.md)",
                        cfg.ami,
                        self.clients.region
                    )
                }
                _ => return Err(line("DescribeImages", &e)),
            },
        }
        let subnets = ec2
            .describe_subnets()
            .set_subnet_ids(Some(cfg.subnets.clone()))
            .send()
            .await
            .map_err(|e| line("ec2.subnets", &e))?;
        let mut out = vec![];
        for s in &cfg.subnets {
            let az = subnets
                .subnets()
                .iter()
                .find(|x| x.subnet_id() == Some(s.as_str()))
                .and_then(|x| x.availability_zone())
                .ok_or_else(|| {
                    anyhow!(
                        "subnet {s} does not exist in {}; check ec2.subnets",
                        self.clients.region
                    )
                })?;
            out.push((s.clone(), az.to_string()));
        }
        if !cfg.security_groups.is_empty() {
            ec2.describe_security_groups()
                .set_group_ids(Some(cfg.security_groups.clone()))
                .send()
                .await
                .map_err(|e| line("ec2.security_groups", &e))?;
        }
        for t in &cfg.instance_types {
            if !InstanceType::values().contains(&t.as_str()) {
                bail!("unknown instance type {t:?} in ec2.instance_types");
            }
        }
        Ok(out)
    }

    /// The configured region must be one EC2 knows (once per run): a typo in the region must
    /// not read as "no instances" or a network error.
    pub async fn check_region(&self) -> Result<()> {
        self.region_checked
            .get_or_try_init(|| async {
                let regions = match self.clients.ec2.describe_regions().all_regions(true).send().await {
                    Ok(r) => r,
                    Err(e) => {
                        return Err(match crate::aws::classify("DescribeRegions", &e) {
                            // Credentials and permissions say so themselves.
                            Failure::Fatal(l) if l.contains("credentials") || l.contains("not allowed") => anyhow!(l),
                            // A region EC2 does not know has no endpoint (real AWS: no DNS name;
                            // moto: an error page).
                            _ => anyhow!(
                                "unknown AWS region {:?}, or EC2 is unreachable there; check ec2.region or AWS_REGION",
                                self.clients.region
                            ),
                        })
                    }
                };
                let known: Vec<&str> = regions.regions().iter().filter_map(|r| r.region_name()).collect();
                if !known.contains(&self.clients.region.as_str()) {
                    bail!(
                        "unknown AWS region {:?}; set ec2.region or AWS_REGION to one of: {}",
                        self.clients.region,
                        known.join(", ")
                    );
                }
                Ok(())
            })
            .await
            .map(|_| ())
    }

    /// One RunInstances call; returns the instances it launched.
    async fn run(
        &self,
        inflight: &Inflight,
    ) -> std::result::Result<
        Vec<NodeInfo>,
        aws_sdk_ec2::error::SdkError<aws_sdk_ec2::operation::run_instances::RunInstancesError>,
    > {
        let cfg = &self.fleet.config.ec2;
        let mut tags = TagSpecification::builder().resource_type(ResourceType::Instance);
        for (k, v) in self.owner.tags() {
            tags = tags.tags(Tag::builder().key(k).value(v).build());
        }
        let tags = tags
            .tags(
                Tag::builder()
                    .key("Name")
                    .value(format!("fleet-{}", self.name()))
                    .build(),
            )
            .build();
        let mut req = self
            .clients
            .ec2
            .run_instances()
            .image_id(&cfg.ami)
            .instance_type(InstanceType::from(inflight.instance_type.as_str()))
            .min_count(1)
            .max_count(inflight.count as i32)
            .subnet_id(&inflight.subnet)
            .set_security_group_ids(
                (!cfg.security_groups.is_empty()).then(|| cfg.security_groups.clone()),
            )
            .set_key_name(cfg.key_name.clone())
            .user_data(base64::engine::general_purpose::STANDARD.encode(&self.user_data))
            .client_token(&inflight.token)
            // The agent's max lifetime powers the node off; that must end the instance.
            .instance_initiated_shutdown_behavior(ShutdownBehavior::Terminate)
            .metadata_options(metadata_options())
            .tag_specifications(tags);
        if let Some(p) = &cfg.instance_profile {
            let spec = if p.starts_with("arn:") {
                IamInstanceProfileSpecification::builder().arn(p).build()
            } else {
                IamInstanceProfileSpecification::builder().name(p).build()
            };
            req = req.iam_instance_profile(spec);
        }
        if cfg.spot {
            req = req.instance_market_options(
                InstanceMarketOptionsRequest::builder()
                    .market_type(MarketType::Spot)
                    .spot_options(
                        SpotMarketOptions::builder()
                            .spot_instance_type(SpotInstanceType::OneTime)
                            .instance_interruption_behavior(InstanceInterruptionBehavior::Terminate)
                            .build(),
                    )
                    .build(),
            );
        }
        let out = req.send().await?;
        Ok(out
            .instances()
            .iter()
            .filter_map(|i| {
                Some(NodeInfo {
                    id: i.instance_id()?.to_string(),
                    state: "pending".into(),
                    live: true,
                    stopped: false,
                    place: i
                        .placement()
                        .and_then(|p| p.availability_zone())
                        .unwrap_or("")
                        .to_string(),
                    kind: inflight.instance_type.clone(),
                    launched: i.launch_time().map(|t| t.secs().max(0) as u64).unwrap_or(0),
                })
            })
            .collect())
    }

    /// A call with retries on throttles and transient errors, same token every time.
    async fn run_with_retries(
        &self,
        inflight: &Inflight,
    ) -> Result<std::result::Result<Vec<NodeInfo>, Failure>> {
        let mut transient = 0;
        let mut delay = TRANSIENT_INITIAL;
        loop {
            match self.run(inflight).await {
                Ok(nodes) => {
                    let mut l = self.limits.lock().unwrap();
                    l.run_requests.succeeded();
                    l.run_instances.succeeded();
                    return Ok(Ok(nodes));
                }
                Err(e) => {
                    match classify("RunInstances", &e) {
                        Failure::Transient if transient < TRANSIENT_LIMIT => {
                            transient += 1;
                            log!("RunInstances failed ({}); retrying with the same token in {delay:?}", aws_sdk_ec2::error::DisplayErrorContext(&e).to_string().replace('\n', " "));
                            tokio::time::sleep(delay).await;
                            delay = (delay * 2).min(TRANSIENT_MAX);
                        }
                        Failure::Transient => return Err(line("RunInstances", &e)),
                        Failure::Fatal(l) => bail!(l),
                        f => return Ok(Err(f)),
                    }
                }
            }
        }
    }

    /// Replays launches a crashed run left in the journal, with their own tokens: EC2 answers
    /// with the instances they made, or makes them now; either way nothing is launched twice.
    pub async fn recover_journal(&self) -> Result<usize> {
        let pending = self.read_journal();
        let mut n = 0;
        for inflight in &pending {
            log!(
                "replaying an interrupted launch ({} × {} in {}, token {})",
                inflight.count,
                inflight.instance_type,
                inflight.subnet,
                inflight.token
            );
            match self.run_with_retries(inflight).await {
                Ok(Ok(nodes)) => n += nodes.len(),
                Ok(Err(Failure::Throttled)) => {
                    // Leave it in the journal: the next run replays it again.
                    bail!("EC2 throttled the replay of an interrupted launch; run `fleet scale` again in a minute")
                }
                // No capacity, or a definite refusal (quota, permissions): that call launched
                // nothing and never will; the plan below launches what is still missing.
                Ok(Err(_)) => {}
                Err(e) => log!("dropping an interrupted launch that EC2 refuses now: {e:#}"),
            }
        }
        self.write_journal(&[])?;
        Ok(n)
    }

    async fn launch_paced(&self, count: usize, progress: &ProgressBar) -> Result<Vec<NodeInfo>> {
        let cfg = &self.fleet.config.ec2;
        let subnets = self.preflight().await?;
        let mut run = LaunchRun {
            count,
            pools: Pools::new(&subnets, &cfg.instance_types),
            launched: vec![],
            throttles: 0,
            throttled_in_a_row: 0,
            capacity_errors: vec![],
            retry: None,
        };
        loop {
            progress.set_position(run.launched.len() as u64);
            match self.next_step(&mut run) {
                Step::Done => break,
                Step::Exhausted => bail!(
                    "no EC2 capacity left in any pool ({} subnets × {} types) after launching {} of {count}: {}",
                    cfg.subnets.len(),
                    cfg.instance_types.len(),
                    run.launched.len(),
                    run.capacity_errors.join("; ")
                ),
                Step::Wait(w) => tokio::time::sleep(w.min(MAX_SLEEP)).await,
                Step::Launch { pool, count: n } => {
                    let inflight = match run.retry.take() {
                        Some(t) => t,
                        None => {
                            let p = run.pools.get(pool);
                            Inflight { token: new_token(), subnet: p.subnet.clone(), instance_type: p.instance_type.clone(), count: n }
                        }
                    };
                    let result = self.launch_journaled(&inflight).await?;
                    self.take_result(&mut run, inflight, result)?;
                }
            }
        }
        progress.set_position(run.launched.len() as u64);
        if run.throttles > 0 {
            log!(
                "RunInstances was throttled {} times; the launcher slowed down and retried",
                run.throttles
            );
        }
        Ok(run.launched)
    }

    /// What the paced launch does next: a throttled call is retried as it was, with its token,
    /// once the budget is back; otherwise the launcher plans the next batch.
    fn next_step(&self, run: &mut LaunchRun) -> Step {
        let remaining = run.count - run.launched.len().min(run.count);
        let mut l = self.limits.lock().unwrap();
        match &run.retry {
            Some(t) => {
                let now = Instant::now();
                let w = l
                    .run_requests
                    .wait_for(1.0, now)
                    .max(l.run_instances.wait_for(t.count as f64, now));
                if w.is_zero() {
                    Step::Launch {
                        pool: usize::MAX,
                        count: t.count,
                    }
                } else {
                    Step::Wait(w)
                }
            }
            None => next_batch(
                remaining,
                run.count,
                &mut run.pools,
                &mut l,
                self.fleet.config.ec2.max_batch,
                MIN_BATCH_WINDOW,
                Instant::now(),
            ),
        }
    }

    /// One RunInstances call: its budget taken, its token journaled before the call (so a
    /// crashed run replays it instead of launching again), and dropped from the journal when the
    /// call is a definite refusal (it launched nothing and must not be replayed).
    async fn launch_journaled(
        &self,
        inflight: &Inflight,
    ) -> Result<std::result::Result<Vec<NodeInfo>, Failure>> {
        {
            let now = Instant::now();
            let mut l = self.limits.lock().unwrap();
            l.run_requests.take(1.0, now);
            l.run_instances.take(inflight.count as f64, now);
        }
        let mut journal = self.read_journal();
        if !journal.iter().any(|j| j.token == inflight.token) {
            journal.push(inflight.clone());
            self.write_journal(&journal)?;
        }
        match self.run_with_retries(inflight).await {
            Ok(r) => Ok(r),
            Err(e) => {
                self.forget_token(&inflight.token)?;
                Err(e)
            }
        }
    }

    fn forget_token(&self, token: &str) -> Result<()> {
        let mut journal = self.read_journal();
        journal.retain(|j| j.token != token);
        self.write_journal(&journal)
    }

    /// Books the outcome of one call: launched nodes (a partial fulfilment gives the unused
    /// budget back and marks the bucket empty), a throttle (the same call again later, same
    /// token), or no capacity (that pool is benched, other pools are tried).
    fn take_result(
        &self,
        run: &mut LaunchRun,
        inflight: Inflight,
        result: std::result::Result<Vec<NodeInfo>, Failure>,
    ) -> Result<()> {
        match result {
            Ok(nodes) => {
                self.forget_token(&inflight.token)?;
                let got = nodes.len();
                if got < inflight.count {
                    // Partial: the pool or our budget was short. Give back what was not used,
                    // assume the bucket is empty, and try other subnets.
                    let now = Instant::now();
                    let mut l = self.limits.lock().unwrap();
                    l.run_instances
                        .give_back((inflight.count - got) as f64, now);
                    l.run_instances.observed_empty(now);
                    log!(
                        "partial fulfilment: {got} of {} {} in {}",
                        inflight.count,
                        inflight.instance_type,
                        inflight.subnet
                    );
                }
                run.launched.extend(nodes);
                run.throttled_in_a_row = 0;
            }
            Err(Failure::Throttled) => {
                run.throttles += 1;
                run.throttled_in_a_row += 1;
                if run.throttled_in_a_row > THROTTLE_LIMIT {
                    bail!(
                        "EC2 kept answering RequestLimitExceeded ({THROTTLE_LIMIT} times in a row) after launching {} of {}; another tool may be using the account's RunInstances budget: run `fleet scale` again later",
                        run.launched.len(),
                        run.count
                    );
                }
                let now = Instant::now();
                let mut l = self.limits.lock().unwrap();
                l.run_requests.throttled(now);
                l.run_instances.throttled(now);
                // Nothing was launched: retry the same call with the same token.
                run.retry = Some(inflight);
            }
            Err(Failure::Capacity) => {
                self.forget_token(&inflight.token)?;
                let now = Instant::now();
                self.limits
                    .lock()
                    .unwrap()
                    .run_instances
                    .give_back(inflight.count as f64, now);
                let pool_idx = (0..run.pools.len()).find(|i| {
                    let p = run.pools.get(*i);
                    p.subnet == inflight.subnet && p.instance_type == inflight.instance_type
                });
                if let Some(i) = pool_idx {
                    run.pools.bench(i, now);
                }
                let what = format!("{} in {}", inflight.instance_type, inflight.subnet);
                log!("no capacity for {what}; moving to other pools");
                run.capacity_errors.push(what);
            }
            Err(f) => bail!("RunInstances: {f:?}"),
        }
        Ok(())
    }
}

/// The state of one paced launch of `count` instances.
struct LaunchRun {
    count: usize,
    pools: Pools,
    launched: Vec<NodeInfo>,
    throttles: u64,
    throttled_in_a_row: u32,
    /// Why pools were benched, for the error when none is left.
    capacity_errors: Vec<String>,
    /// A throttled call, to be made again with its own token.
    retry: Option<Inflight>,
}

impl Backend for Ec2 {
    fn name(&self) -> &'static str {
        self.backend_name
    }

    async fn recover(&self) -> Result<()> {
        self.recover_journal().await.map(|_| ())
    }

    async fn observe(&self) -> Result<Vec<NodeInfo>> {
        self.check_region().await?;
        let mut out = vec![];
        let mut next: Option<String> = None;
        loop {
            self.sleep_on_describe().await;
            let page = self
                .clients
                .ec2
                .describe_instances()
                .set_filters(Some(owner_filters(&self.owner)))
                .filters(
                    Filter::builder()
                        .name("instance-state-name")
                        .values("pending")
                        .values("running")
                        .values("stopping")
                        .values("stopped")
                        .build(),
                )
                .max_results(1000)
                .set_next_token(next.take())
                .send()
                .await
                .map_err(|e| line("DescribeInstances", &e))?;
            for r in page.reservations() {
                for i in r.instances() {
                    let Some(id) = i.instance_id() else { continue };
                    if !self.owner.owns(tags_of(i)) {
                        continue;
                    }
                    let state = i
                        .state()
                        .and_then(|s| s.name())
                        .map(|n| n.as_str().to_string())
                        .unwrap_or_default();
                    out.push(NodeInfo {
                        id: id.to_string(),
                        live: state == "pending" || state == "running",
                        stopped: state == "stopping" || state == "stopped",
                        state,
                        place: i
                            .placement()
                            .and_then(|p| p.availability_zone())
                            .unwrap_or("")
                            .to_string(),
                        kind: i
                            .instance_type()
                            .map(|t| t.as_str().to_string())
                            .unwrap_or_default(),
                        launched: i.launch_time().map(|t| t.secs().max(0) as u64).unwrap_or(0),
                    });
                }
            }
            match page.next_token() {
                Some(t) if !t.is_empty() => next = Some(t.to_string()),
                _ => break,
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    async fn launch(&self, count: usize, progress: &ProgressBar) -> Result<Vec<NodeInfo>> {
        self.launch_paced(count, progress).await
    }

    async fn terminate(&self, ids: &[String], progress: &ProgressBar) -> Result<()> {
        let checked = self.recheck(ids).await?;
        self.terminate_ours(&checked.ours, progress).await?;
        if !checked.refused.is_empty() {
            bail!(refused_line("instances", &checked.refused));
        }
        Ok(())
    }
}

impl Ec2 {
    /// Lists `ids` afresh and decides which are exactly ours ([`check_targets`]): the re-check
    /// every destructive call goes through, however the ids were found.
    pub async fn recheck(&self, ids: &[String]) -> Result<Checked> {
        let mut seen = vec![];
        for chunk in ids.chunks(FILTER_VALUES) {
            let mut next: Option<String> = None;
            loop {
                self.sleep_on_describe().await;
                let page = self
                    .clients
                    .ec2
                    .describe_instances()
                    .filters(
                        Filter::builder()
                            .name("instance-id")
                            .set_values(Some(chunk.to_vec()))
                            .build(),
                    )
                    .set_next_token(next.take())
                    .send()
                    .await
                    .map_err(|e| line("DescribeInstances", &e))?;
                for i in page.reservations().iter().flat_map(|r| r.instances()) {
                    if let Some(id) = i.instance_id() {
                        seen.push(Seen {
                            id: id.to_string(),
                            tags: tags_of(i)
                                .map(|(k, v)| (k.to_string(), v.to_string()))
                                .collect(),
                        });
                    }
                }
                match page.next_token() {
                    Some(t) if !t.is_empty() => next = Some(t.to_string()),
                    _ => break,
                }
            }
        }
        Ok(check_targets(&self.owner, ids, &seen))
    }

    /// TerminateInstances on ids [`Ec2::recheck`] found ours, paced and retried.
    async fn terminate_ours(&self, ids: &[String], progress: &ProgressBar) -> Result<()> {
        let mut done = 0;
        let mut delay = TRANSIENT_INITIAL;
        let mut transient = 0;
        while done < ids.len() {
            let (wait, n) = {
                let mut l = self.limits.lock().unwrap();
                let now = Instant::now();
                let have = l.terminate_instances.available(now).floor().max(1.0) as usize;
                let n = (ids.len() - done).min(have).min(1000);
                (
                    l.terminate_requests
                        .wait_for(1.0, now)
                        .max(l.terminate_instances.wait_for(n as f64, now)),
                    n,
                )
            };
            if !wait.is_zero() {
                tokio::time::sleep(wait.min(MAX_SLEEP)).await;
                continue;
            }
            {
                let now = Instant::now();
                let mut l = self.limits.lock().unwrap();
                l.terminate_requests.take(1.0, now);
                l.terminate_instances.take(n as f64, now);
            }
            let batch = ids[done..done + n].to_vec();
            match self
                .clients
                .ec2
                .terminate_instances()
                .set_instance_ids(Some(batch))
                .send()
                .await
            {
                Ok(_) => {
                    self.limits.lock().unwrap().terminate_requests.succeeded();
                    done += n;
                    progress.set_position(done as u64);
                    transient = 0;
                }
                Err(e) => match classify("TerminateInstances", &e) {
                    Failure::Throttled => {
                        let now = Instant::now();
                        let mut l = self.limits.lock().unwrap();
                        l.terminate_requests.throttled(now);
                        l.terminate_instances.throttled(now);
                    }
                    Failure::Transient | Failure::Capacity if transient < TRANSIENT_LIMIT => {
                        transient += 1;
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(TRANSIENT_MAX);
                    }
                    _ => return Err(line("TerminateInstances", &e)),
                },
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instances_get_imdsv2_with_an_explicit_hop_limit_of_one() {
        let m = metadata_options();
        assert_eq!(m.http_tokens(), Some(&HttpTokensState::Required));
        assert_eq!(m.http_put_response_hop_limit(), Some(1));
        assert_eq!(
            m.http_endpoint(),
            Some(&InstanceMetadataEndpointState::Enabled)
        );
    }

    #[test]
    fn listings_are_narrowed_by_both_tags() {
        let f = owner_filters(&Owner {
            name: "load".into(),
            id: "0123456789abcdef".into(),
        });
        let got: Vec<(&str, &[String])> =
            f.iter().map(|f| (f.name().unwrap(), f.values())).collect();
        assert_eq!(
            got,
            [
                ("tag:fleet", &["load".to_string()][..]),
                ("tag:fleet-id", &["0123456789abcdef".to_string()][..])
            ]
        );
    }
}
