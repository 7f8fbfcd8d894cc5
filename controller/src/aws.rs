//! AWS clients for the `ec2` and `asg` backends: the standard credential and region chains
//! (`AWS_PROFILE`, env vars, SSO, instance role; `AWS_REGION`, profile), an optional endpoint
//! (moto and the throttling emulator in tests; `AWS_ENDPOINT_URL` also works), and one-line
//! errors.

use anyhow::{anyhow, Result};
use aws_config::retry::RetryConfig;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_ec2::config::http::HttpResponse;
use aws_sdk_ec2::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};

use crate::config::Ec2Config;

/// The SDK's own retries are a last resort: the launcher paces itself on EC2's buckets and
/// retries throttled calls on its own schedule. One SDK retry remains for transient network
/// errors, and it reuses the call's idempotency token.
const SDK_MAX_ATTEMPTS: u32 = 2;

pub struct Clients {
    pub ec2: aws_sdk_ec2::Client,
    pub asg: aws_sdk_autoscaling::Client,
    pub region: String,
}

pub async fn clients(cfg: &Ec2Config) -> Result<Clients> {
    // ring, like the rest of fleet: no second TLS stack with a C library.
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(CryptoMode::Ring))
        .build_https();
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .http_client(http)
        .retry_config(RetryConfig::standard().with_max_attempts(SDK_MAX_ATTEMPTS));
    if let Some(r) = &cfg.region {
        loader = loader.region(Region::new(r.clone()));
    }
    if let Some(e) = &cfg.endpoint_url {
        loader = loader.endpoint_url(e.clone());
    }
    let shared = loader.load().await;
    let region = shared
        .region()
        .map(|r| r.to_string())
        .ok_or_else(|| anyhow!("no AWS region: set ec2.region in fleet.toml, AWS_REGION, or a region in your AWS profile"))?;
    Ok(Clients {
        ec2: aws_sdk_ec2::Client::new(&shared),
        asg: aws_sdk_autoscaling::Client::new(&shared),
        region,
    })
}

/// What kind of failure an AWS error is, for the launcher's decisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    Throttled,
    /// The pool (AZ × instance type) has no capacity now.
    Capacity,
    /// Worth retrying as it was (network, 5xx).
    Transient,
    /// Stop: the line says what to fix.
    Fatal(String),
}

/// Classifies an SDK error and writes its one line.
pub fn classify<E>(what: &str, e: &SdkError<E, HttpResponse>) -> Failure
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let code = e.code().unwrap_or("");
    let msg = e.message().unwrap_or("").to_string();
    match code {
        "RequestLimitExceeded" | "Throttling" | "ThrottlingException" => Failure::Throttled,
        "InsufficientInstanceCapacity" | "InsufficientCapacity" | "Unsupported" | "InsufficientHostCapacity" => {
            Failure::Capacity
        }
        "InternalError" | "InternalFailure" | "ServiceUnavailable" | "Unavailable" | "ResourceContention" => {
            Failure::Transient
        }
        "InstanceLimitExceeded" | "VcpuLimitExceeded" | "MaxSpotInstanceCountExceeded" | "LimitExceeded" => {
            Failure::Fatal(format!("{what}: EC2 quota exhausted ({code}: {msg}); request a limit increase or scale to fewer nodes"))
        }
        "AuthFailure" | "UnrecognizedClientException" | "InvalidClientTokenId" | "SignatureDoesNotMatch"
        | "ExpiredToken" | "InvalidAccessKeyId" => Failure::Fatal(format!(
            "{what}: AWS rejected the credentials ({code}); check AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
        )),
        "UnauthorizedOperation" | "AccessDenied" | "AccessDeniedException" => Failure::Fatal(format!(
            "{what}: not allowed ({code}); the credentials need the EC2/Auto Scaling permissions in docs/ec2.md"
        )),
        "" => {
            let full = DisplayErrorContext(e).to_string();
            if full.contains("credentials") || full.contains("Credentials") {
                Failure::Fatal(format!(
                    "{what}: no AWS credentials found; set AWS_PROFILE, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, log in with SSO, or run with an instance role"
                ))
            } else if matches!(e, SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) | SdkError::ResponseError(_))
                || e.raw_response().is_some_and(|r| r.status().is_server_error())
            {
                // No code, but the network or a 5xx: retried, with the same token.
                Failure::Transient
            } else {
                Failure::Fatal(format!("{what}: {}", short(e)))
            }
        }
        _ => Failure::Fatal(format!("{what}: {code}: {msg}")),
    }
}

/// A fatal error's line, or a generic one for the others.
pub fn line<E>(what: &str, e: &SdkError<E, HttpResponse>) -> anyhow::Error
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    match classify(what, e) {
        Failure::Fatal(l) => anyhow!(l),
        Failure::Throttled => {
            anyhow!("{what}: still throttled by AWS after retries (RequestLimitExceeded)")
        }
        Failure::Capacity => anyhow!("{what}: no capacity"),
        Failure::Transient => anyhow!(
            "{what}: AWS unreachable or failing ({}); retry later",
            short(e)
        ),
    }
}

/// A short description of a failure without an AWS error code: the HTTP status, or the
/// transport error's own words.
fn short<E>(e: &SdkError<E, HttpResponse>) -> String
where
    E: std::error::Error + 'static,
{
    if let Some(r) = e.raw_response() {
        return format!("HTTP {}", r.status().as_u16());
    }
    let full = DisplayErrorContext(e).to_string().replace('\n', " ");
    full.chars().take(200).collect()
}
