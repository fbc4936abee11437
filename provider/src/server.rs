//! The tfplugin6 `Provider` gRPC service and go-plugin's `GRPCController`.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use std::sync::RwLock;

use tokio::sync::{watch, Notify};
use tonic::{Request, Response, Status};

use crate::diag::{Diagnostic, Diagnostics};
use crate::provider_config::{self, ProviderConfig};
use crate::resource::{ApplyRequest, DataSource, PlanRequest, Resource, StateOutcome};
use crate::schema::Block;
use crate::tfplugin6 as pb;
use crate::value::{conform, Value};

impl fmt::Debug for pb::DynamicValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "DynamicValue(<msgpack {} bytes, json {} bytes>)",
            self.msgpack.len(),
            self.json.len()
        )
    }
}

pub struct ProviderService {
    resources: BTreeMap<&'static str, Arc<dyn Resource>>,
    data_sources: BTreeMap<&'static str, Arc<dyn DataSource>>,
    /// Bumped by StopProvider; in-flight operations watch it and abort.
    stop: watch::Sender<u64>,
    /// Set by ConfigureProvider; no RPC that touches a cluster or reads a folder runs before.
    config: RwLock<Option<Arc<ProviderConfig>>>,
    /// Whether the Terraform of ConfigureProvider keeps write-only attributes out of plan and
    /// state (1.11+): a plan refuses write-only values otherwise. Validation cannot alone: its
    /// values may be unknown (variables during `terraform validate`).
    write_only_supported: std::sync::atomic::AtomicBool,
}

impl ProviderService {
    pub fn new(resources: Vec<Arc<dyn Resource>>, data_sources: Vec<Arc<dyn DataSource>>) -> Self {
        Self {
            resources: resources.into_iter().map(|r| (r.type_name(), r)).collect(),
            data_sources: data_sources
                .into_iter()
                .map(|d| (d.type_name(), d))
                .collect(),
            stop: watch::channel(0).0,
            config: RwLock::new(None),
            write_only_supported: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The provider configuration, or the diagnostic for an RPC that came before it.
    fn configured(&self) -> Result<Arc<ProviderConfig>, Diagnostics> {
        self.config
            .read()
            .map_err(|_| provider_config::not_configured())?
            .clone()
            .ok_or_else(provider_config::not_configured)
    }

    fn resource(&self, name: &str) -> Result<&Arc<dyn Resource>, Diagnostics> {
        self.resources.get(name).ok_or_else(|| {
            Diagnostic::error(
                "Unknown resource type",
                format!("this provider has no resource {name:?}"),
            )
            .into()
        })
    }

    fn data_source(&self, name: &str) -> Result<&Arc<dyn DataSource>, Diagnostics> {
        self.data_sources.get(name).ok_or_else(|| {
            Diagnostic::error(
                "Unknown data source",
                format!("this provider has no data source {name:?}"),
            )
            .into()
        })
    }

    /// Runs `op` until it finishes or StopProvider arrives, whichever is first.
    async fn cancellable<T>(
        &self,
        op: impl std::future::Future<Output = Result<T, Diagnostics>>,
    ) -> Result<T, Diagnostics> {
        let mut stopped = self.stop.subscribe();
        tokio::select! {
            r = op => r,
            _ = stopped.changed() => Err(Diagnostic::error(
                "Operation cancelled",
                "Terraform asked the provider to stop (interrupt); the operation was abandoned",
            ).into()),
        }
    }
}

fn decode(dv: Option<&pb::DynamicValue>, schema: &Block) -> Result<Value, Diagnostics> {
    let value = match dv {
        Some(dv) if !dv.msgpack.is_empty() => Value::from_msgpack(&dv.msgpack),
        Some(dv) if !dv.json.is_empty() => Value::from_json(&dv.json),
        _ => Ok(Value::Null),
    }
    .and_then(|v| conform(v, &schema.value_type()));
    value.map_err(|e| Diagnostic::error("Malformed value from Terraform", e.to_string()).into())
}

/// A value with every write-only attribute of `schema` set to null. Terraform 1.11+ requires
/// null there in plans and states; for every version it keeps the secret out of what Terraform
/// stores, whatever a resource returned.
fn without_write_only(schema: &Block, mut value: Value) -> Value {
    if !value.is_null() {
        for name in schema.write_only_attributes() {
            value.set(name, Value::Null);
        }
    }
    value
}

/// Terraform 1.11 introduced write-only attributes; `version` is ConfigureProvider's
/// `terraform_version` (e.g. "1.15.5", "1.0.3"). Unparsable means no.
fn supports_write_only(version: &str) -> bool {
    let mut parts = version.split('.').map(|p| {
        p.chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse::<u32>()
            .ok()
    });
    matches!(
        (parts.next().flatten(), parts.next().flatten()),
        (Some(major), Some(minor)) if (major, minor) >= (1, 11)
    )
}

/// Write-only attributes set in `config` when Terraform did not announce that it keeps them out
/// of plan and state (Terraform before 1.11, e.g. 1.0, would store them like any attribute).
/// `unknown_is_set`: at plan time an unknown value will be set; during validation it may be
/// a variable that is null in the end, so only the plan refuses it.
fn refuse_write_only(
    schema: &Block,
    config: &Value,
    allowed: bool,
    unknown_is_set: bool,
) -> Diagnostics {
    let mut diagnostics = Diagnostics::default();
    if allowed {
        return diagnostics;
    }
    for name in schema.write_only_attributes() {
        let value = config.get(name);
        if !value.is_null() && (unknown_is_set || !value.is_unknown()) {
            diagnostics.push(
                Diagnostic::error(
                    "Write-only attribute needs Terraform 1.11 or later",
                    format!(
                        "{name} is write-only: Terraform 1.11 and later keep it out of plan and \
                         state. This Terraform does not support write-only attributes and would \
                         store it in the state file, so it is refused. Upgrade Terraform, or use \
                         the attribute without the _wo suffix (Sensitive, kept in state)."
                    ),
                )
                .at(crate::diag::AttrPath::attr(&[name])),
            );
        }
    }
    diagnostics
}

fn dynamic(v: &Value) -> Option<pb::DynamicValue> {
    Some(pb::DynamicValue {
        msgpack: v.to_msgpack(),
        json: Vec::new(),
    })
}

fn schema_map<T: ?Sized>(
    items: &BTreeMap<&'static str, Arc<T>>,
    schema: impl Fn(&T) -> &Block,
) -> std::collections::HashMap<String, pb::Schema> {
    items
        .iter()
        .map(|(name, r)| ((*name).to_owned(), schema(r).to_proto()))
        .collect()
}

fn empty_schema() -> pb::Schema {
    Block {
        version: 0,
        description: "",
        attributes: Vec::new(),
    }
    .to_proto()
}

#[tonic::async_trait]
impl pb::provider_server::Provider for ProviderService {
    async fn get_metadata(
        &self,
        _: Request<pb::get_metadata::Request>,
    ) -> Result<Response<pb::get_metadata::Response>, Status> {
        Ok(Response::new(pb::get_metadata::Response {
            server_capabilities: Some(capabilities()),
            diagnostics: Vec::new(),
            data_sources: self
                .data_sources
                .keys()
                .map(|n| pb::get_metadata::DataSourceMetadata {
                    type_name: (*n).to_owned(),
                })
                .collect(),
            resources: self
                .resources
                .keys()
                .map(|n| pb::get_metadata::ResourceMetadata {
                    type_name: (*n).to_owned(),
                })
                .collect(),
        }))
    }

    async fn get_provider_schema(
        &self,
        _: Request<pb::get_provider_schema::Request>,
    ) -> Result<Response<pb::get_provider_schema::Response>, Status> {
        Ok(Response::new(pb::get_provider_schema::Response {
            provider: Some(provider_config::schema().to_proto()),
            resource_schemas: schema_map(&self.resources, |r| r.schema()),
            data_source_schemas: schema_map(&self.data_sources, |d| d.schema()),
            diagnostics: Vec::new(),
            provider_meta: Some(empty_schema()),
            server_capabilities: Some(capabilities()),
        }))
    }

    async fn validate_provider_config(
        &self,
        req: Request<pb::validate_provider_config::Request>,
    ) -> Result<Response<pb::validate_provider_config::Response>, Status> {
        let req = req.into_inner();
        let diagnostics = decode(req.config.as_ref(), &provider_config::schema())
            .and_then(|config| ProviderConfig::decode(&config, &working_dir()?))
            .err()
            .unwrap_or_default();
        Ok(Response::new(pb::validate_provider_config::Response {
            diagnostics: diagnostics.to_proto(),
        }))
    }

    async fn validate_resource_config(
        &self,
        req: Request<pb::validate_resource_config::Request>,
    ) -> Result<Response<pb::validate_resource_config::Response>, Status> {
        let req = req.into_inner();
        let write_only_allowed = req
            .client_capabilities
            .is_some_and(|c| c.write_only_attributes_allowed);
        // Known values are refused here; unknown ones at plan time (see `plan_resource_change`).
        let diags = self.resource(&req.type_name).and_then(|r| {
            let config = decode(req.config.as_ref(), r.schema())?;
            let mut diags = refuse_write_only(r.schema(), &config, write_only_allowed, false);
            diags.extend(r.validate(&config));
            Ok(diags)
        });
        Ok(Response::new(pb::validate_resource_config::Response {
            diagnostics: diags.unwrap_or_else(|d| d).to_proto(),
        }))
    }

    async fn validate_data_resource_config(
        &self,
        req: Request<pb::validate_data_resource_config::Request>,
    ) -> Result<Response<pb::validate_data_resource_config::Response>, Status> {
        let req = req.into_inner();
        let diags = self.data_source(&req.type_name).and_then(|d| {
            let config = decode(req.config.as_ref(), d.schema())?;
            Ok(d.validate(&config))
        });
        Ok(Response::new(pb::validate_data_resource_config::Response {
            diagnostics: diags.unwrap_or_else(|d| d).to_proto(),
        }))
    }

    async fn upgrade_resource_state(
        &self,
        req: Request<pb::upgrade_resource_state::Request>,
    ) -> Result<Response<pb::upgrade_resource_state::Response>, Status> {
        // Called before every read with the stored JSON; schema version 0 needs no migration,
        // only reshaping (attributes added since are null, removed ones dropped).
        let req = req.into_inner();
        let result = self.resource(&req.type_name).and_then(|r| {
            if req.version > r.schema().version {
                return Err(Diagnostic::error(
                    "State is from a newer provider",
                    format!(
                        "state schema version {} is newer than this provider's {}",
                        req.version,
                        r.schema().version
                    ),
                )
                .into());
            }
            let raw = req.raw_state.as_ref();
            let json = raw.map(|s| s.json.as_slice()).unwrap_or_default();
            if json.is_empty() {
                if raw.is_some_and(|s| !s.flatmap.is_empty()) {
                    return Err(Diagnostic::error(
                        "Legacy state format",
                        "flatmap state (Terraform < 0.12) is not supported",
                    )
                    .into());
                }
                return Ok(Value::Null);
            }
            Value::from_json(json)
                .and_then(|v| conform(v, &r.schema().value_type()))
                .map_err(|e| Diagnostic::error("Stored state is unreadable", e.to_string()).into())
        });
        Ok(Response::new(match result {
            Ok(v) => pb::upgrade_resource_state::Response {
                upgraded_state: dynamic(&v),
                diagnostics: Vec::new(),
            },
            Err(d) => pb::upgrade_resource_state::Response {
                upgraded_state: None,
                diagnostics: d.to_proto(),
            },
        }))
    }

    async fn configure_provider(
        &self,
        req: Request<pb::configure_provider::Request>,
    ) -> Result<Response<pb::configure_provider::Response>, Status> {
        let req = req.into_inner();
        let result = decode(req.config.as_ref(), &provider_config::schema())
            .and_then(|config| ProviderConfig::decode(&config, &working_dir()?));
        let diagnostics = match result {
            Ok(config) => {
                self.write_only_supported.store(
                    supports_write_only(&req.terraform_version),
                    std::sync::atomic::Ordering::Relaxed,
                );
                if let Ok(mut slot) = self.config.write() {
                    *slot = Some(Arc::new(config));
                }
                Diagnostics::default()
            }
            Err(d) => d,
        };
        Ok(Response::new(pb::configure_provider::Response {
            diagnostics: diagnostics.to_proto(),
        }))
    }

    async fn read_resource(
        &self,
        req: Request<pb::read_resource::Request>,
    ) -> Result<Response<pb::read_resource::Response>, Status> {
        let req = req.into_inner();
        let result = async {
            self.configured()?;
            let r = self.resource(&req.type_name)?;
            let current = decode(req.current_state.as_ref(), r.schema())?;
            if current.is_null() {
                return Ok(StateOutcome::default());
            }
            let out = self.cancellable(r.read(&current, &req.private)).await?;
            Ok::<_, Diagnostics>(StateOutcome {
                state: without_write_only(r.schema(), out.state),
                ..out
            })
        }
        .await;
        Ok(Response::new(match result {
            Ok(out) => pb::read_resource::Response {
                new_state: dynamic(&out.state),
                diagnostics: out.warnings.to_proto(),
                private: out.private,
            },
            // Keep the state as it was: a failed refresh must not drop the resource.
            Err(d) => pb::read_resource::Response {
                new_state: req.current_state.clone(),
                diagnostics: d.to_proto(),
                private: req.private.clone(),
            },
        }))
    }

    async fn plan_resource_change(
        &self,
        req: Request<pb::plan_resource_change::Request>,
    ) -> Result<Response<pb::plan_resource_change::Response>, Status> {
        let req = req.into_inner();
        let result = (|| {
            self.configured()?;
            let r = self.resource(&req.type_name)?;
            let prior = decode(req.prior_state.as_ref(), r.schema())?;
            // Write-only values are read from `config` only: in `proposed` they would look
            // like a change on every plan (the prior state never holds them).
            let proposed = without_write_only(
                r.schema(),
                decode(req.proposed_new_state.as_ref(), r.schema())?,
            );
            let config = decode(req.config.as_ref(), r.schema())?;
            let supported = self
                .write_only_supported
                .load(std::sync::atomic::Ordering::Relaxed);
            let refused = refuse_write_only(r.schema(), &config, supported, true);
            if refused.has_errors() {
                return Err(refused);
            }
            let mut planned = r.plan(PlanRequest {
                prior: &prior,
                proposed: &proposed,
                config: &config,
            })?;
            planned.state = without_write_only(r.schema(), planned.state);
            Ok::<_, Diagnostics>(planned)
        })();
        Ok(Response::new(match result {
            Ok(planned) => pb::plan_resource_change::Response {
                planned_state: dynamic(&planned.state),
                requires_replace: planned
                    .requires_replace
                    .iter()
                    .map(|p| p.to_proto())
                    .collect(),
                planned_private: req.prior_private,
                diagnostics: planned.warnings.to_proto(),
                legacy_type_system: false,
            },
            Err(d) => pb::plan_resource_change::Response {
                diagnostics: d.to_proto(),
                ..Default::default()
            },
        }))
    }

    async fn apply_resource_change(
        &self,
        req: Request<pb::apply_resource_change::Request>,
    ) -> Result<Response<pb::apply_resource_change::Response>, Status> {
        let req = req.into_inner();
        let result = async {
            self.configured()?;
            let r = self.resource(&req.type_name)?;
            let prior = decode(req.prior_state.as_ref(), r.schema())?;
            let planned = decode(req.planned_state.as_ref(), r.schema())?;
            let config = decode(req.config.as_ref(), r.schema())?;
            let out = self
                .cancellable(r.apply(ApplyRequest {
                    prior: &prior,
                    planned: &planned,
                    config: &config,
                    private: &req.planned_private,
                }))
                .await
                .map(|out| StateOutcome {
                    state: without_write_only(r.schema(), out.state),
                    ..out
                });
            Ok::<_, Diagnostics>(out)
        }
        .await
        .and_then(|x| x);
        Ok(Response::new(match result {
            Ok(out) => pb::apply_resource_change::Response {
                new_state: dynamic(&out.state),
                private: out.private,
                diagnostics: out.warnings.to_proto(),
                legacy_type_system: false,
            },
            // On failure the object stays as it was: null for a create, the prior otherwise.
            Err(d) => pb::apply_resource_change::Response {
                new_state: req.prior_state.clone().or_else(|| dynamic(&Value::Null)),
                private: req.planned_private.clone(),
                diagnostics: d.to_proto(),
                legacy_type_system: false,
            },
        }))
    }

    async fn import_resource_state(
        &self,
        req: Request<pb::import_resource_state::Request>,
    ) -> Result<Response<pb::import_resource_state::Response>, Status> {
        let req = req.into_inner();
        let result = async {
            let config = self.configured()?;
            let r = self.resource(&req.type_name)?;
            let out = self.cancellable(r.import(&req.id, &config)).await?;
            Ok::<_, Diagnostics>(StateOutcome {
                state: without_write_only(r.schema(), out.state),
                ..out
            })
        }
        .await;
        Ok(Response::new(match result {
            Ok(out) => pb::import_resource_state::Response {
                imported_resources: vec![pb::import_resource_state::ImportedResource {
                    type_name: req.type_name,
                    state: dynamic(&out.state),
                    private: out.private,
                }],
                diagnostics: out.warnings.to_proto(),
            },
            Err(d) => pb::import_resource_state::Response {
                imported_resources: Vec::new(),
                diagnostics: d.to_proto(),
            },
        }))
    }

    async fn read_data_source(
        &self,
        req: Request<pb::read_data_source::Request>,
    ) -> Result<Response<pb::read_data_source::Response>, Status> {
        let req = req.into_inner();
        let result = self.configured().and_then(|_| {
            let d = self.data_source(&req.type_name)?;
            let config = decode(req.config.as_ref(), d.schema())?;
            d.read(&config)
        });
        Ok(Response::new(match result {
            Ok(state) => pb::read_data_source::Response {
                state: dynamic(&state),
                diagnostics: Vec::new(),
            },
            Err(d) => pb::read_data_source::Response {
                state: None,
                diagnostics: d.to_proto(),
            },
        }))
    }

    async fn stop_provider(
        &self,
        _: Request<pb::stop_provider::Request>,
    ) -> Result<Response<pb::stop_provider::Response>, Status> {
        tracing::info!("StopProvider: cancelling in-flight operations");
        self.stop.send_modify(|generation| *generation += 1);
        Ok(Response::new(Default::default()))
    }
}

/// Terraform starts the provider in its working directory: the root of relative paths.
fn working_dir() -> Result<std::path::PathBuf, Diagnostics> {
    std::env::current_dir().map_err(|e| {
        Diagnostic::error(
            "Cannot read the working directory",
            format!("the provider cannot resolve its working directory: {e}"),
        )
        .into()
    })
}

/// `get_provider_schema_optional`: no RPC depends on GetProviderSchema having been called, so
/// Terraform (≥ 1.6) may serve later plugin starts of one command from its schema cache.
fn capabilities() -> pb::ServerCapabilities {
    pb::ServerCapabilities {
        plan_destroy: false,
        get_provider_schema_optional: true,
    }
}

/// go-plugin's controller: Shutdown makes the plugin exit at once.
pub struct Controller {
    pub shutdown: Arc<Notify>,
}

#[tonic::async_trait]
impl crate::go_plugin::grpc_controller_server::GrpcController for Controller {
    async fn shutdown(
        &self,
        _: Request<crate::go_plugin::Empty>,
    ) -> Result<Response<crate::go_plugin::Empty>, Status> {
        self.shutdown.notify_one();
        Ok(Response::new(crate::go_plugin::Empty {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tfplugin6::provider_server::Provider as _;

    fn service() -> ProviderService {
        ProviderService::new(
            vec![Arc::new(crate::image::ImageResource::new())],
            vec![Arc::new(
                crate::attestation_data::AttestationDataSource::new(),
            )],
        )
    }

    fn summaries(diagnostics: &[pb::Diagnostic]) -> Vec<&str> {
        diagnostics.iter().map(|d| d.summary.as_str()).collect()
    }

    fn cluster_service() -> ProviderService {
        let backend = crate::cluster::local_backend::LocalBackend::new("/nonexistent".into());
        ProviderService::new(
            vec![Arc::new(crate::cluster::ClusterResource::new(Arc::new(
                backend,
            )))],
            Vec::new(),
        )
    }

    fn write_only_config() -> Value {
        let mut config = crate::cluster::resource::tests::config();
        config.set("master_secret_wo", Value::string("5e".repeat(32)));
        config.set("master_secret_wo_version", Value::Number(1.0));
        config
    }

    async fn validate_cluster(
        p: &ProviderService,
        config: &Value,
        caps: Option<pb::ClientCapabilities>,
    ) -> Vec<pb::Diagnostic> {
        p.validate_resource_config(Request::new(pb::validate_resource_config::Request {
            type_name: "constellation_cluster".into(),
            config: dynamic(config),
            client_capabilities: caps,
        }))
        .await
        .unwrap()
        .into_inner()
        .diagnostics
    }

    #[tokio::test]
    async fn a_write_only_secret_is_refused_unless_terraform_keeps_it_out_of_state() {
        let p = cluster_service();
        let config = write_only_config();
        // Terraform 1.0 sends no capabilities: it would store the value, so it is refused.
        let refused = validate_cluster(&p, &config, None).await;
        assert_eq!(
            summaries(&refused),
            ["Write-only attribute needs Terraform 1.11 or later"]
        );
        let at = refused[0]
            .attribute
            .as_ref()
            .expect("points at the attribute");
        assert_eq!(
            at.steps[0].selector,
            Some(pb::attribute_path::step::Selector::AttributeName(
                "master_secret_wo".into()
            ))
        );
        assert!(!refused[0].detail.contains(&"5e".repeat(32)));
        let explicit_no = pb::ClientCapabilities {
            deferral_allowed: true,
            write_only_attributes_allowed: false,
        };
        assert_eq!(
            validate_cluster(&p, &config, Some(explicit_no)).await.len(),
            1
        );
        // Terraform 1.11+ announces it: accepted.
        let allowed = pb::ClientCapabilities {
            deferral_allowed: false,
            write_only_attributes_allowed: true,
        };
        assert!(validate_cluster(&p, &config, Some(allowed))
            .await
            .is_empty());
        // The Sensitive master_secret stays usable on every version.
        let mut stored = crate::cluster::resource::tests::config();
        stored.set("master_secret", Value::string("ab".repeat(32)));
        assert!(validate_cluster(&p, &stored, None).await.is_empty());
    }

    /// A cluster service configured by Terraform `version`.
    async fn configured_cluster_service(version: &str) -> ProviderService {
        let p = cluster_service();
        p.configure_provider(Request::new(pb::configure_provider::Request {
            terraform_version: version.into(),
            ..Default::default()
        }))
        .await
        .unwrap();
        p
    }

    /// PlanResourceChange for creating a cluster with `config`.
    async fn plan_create(
        p: &ProviderService,
        config: &Value,
    ) -> pb::plan_resource_change::Response {
        p.plan_resource_change(Request::new(pb::plan_resource_change::Request {
            type_name: "constellation_cluster".into(),
            prior_state: dynamic(&Value::Null),
            proposed_new_state: dynamic(config),
            config: dynamic(config),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
    }

    #[tokio::test]
    async fn a_write_only_secret_is_in_no_planned_state() {
        let p = configured_cluster_service("1.15.5").await;
        let config = write_only_config();
        let planned = plan_create(&p, &config).await;
        assert!(planned.diagnostics.is_empty(), "{:?}", planned.diagnostics);
        let bytes = planned.planned_state.expect("a plan").msgpack;
        let state = Value::from_msgpack(&bytes).unwrap();
        assert!(state.get("master_secret_wo").is_null());
        // Not "known after apply" either: no master secret is generated or kept.
        assert!(state.get("master_secret").is_null());
        assert_eq!(state.get("master_secret_wo_version"), &Value::Number(1.0));
        assert!(state.get("master_secret_salt").is_unknown());
        let secret_hex = "5e".repeat(32);
        assert!(!bytes
            .windows(secret_hex.len())
            .any(|w| w == secret_hex.as_bytes()));
    }

    #[tokio::test]
    async fn a_plan_refuses_a_write_only_secret_from_terraform_before_1_11() {
        assert!(supports_write_only("1.11.0") && supports_write_only("1.15.5"));
        assert!(supports_write_only("2.0.0-alpha1"));
        assert!(!supports_write_only("1.10.5") && !supports_write_only("1.0.3"));
        assert!(!supports_write_only("") && !supports_write_only("x"));
        let p = configured_cluster_service("1.0.3").await;
        // Unknown during validation (a variable): not refused there...
        let mut config = write_only_config();
        config.set("master_secret_wo", Value::Unknown);
        assert!(validate_cluster(&p, &config, None).await.is_empty());
        // ...but at plan time, known or not.
        for secret in [Value::Unknown, Value::string("5e".repeat(32))] {
            config.set("master_secret_wo", secret);
            let planned = plan_create(&p, &config).await;
            assert!(planned.planned_state.is_none());
            assert_eq!(
                summaries(&planned.diagnostics),
                ["Write-only attribute needs Terraform 1.11 or later"]
            );
        }
    }

    #[tokio::test]
    async fn no_rpc_touches_a_cluster_or_folder_before_configure_provider() {
        let p = service();
        let import = p
            .import_resource_state(Request::new(pb::import_resource_state::Request {
                type_name: "constellation_image".into(),
                id: "/".into(),
            }))
            .await
            .unwrap()
            .into_inner();
        assert!(import.imported_resources.is_empty());
        assert_eq!(summaries(&import.diagnostics), ["Provider not configured"]);
        let read = p
            .read_resource(Request::new(pb::read_resource::Request {
                type_name: "constellation_image".into(),
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(summaries(&read.diagnostics), ["Provider not configured"]);
        let apply = p
            .apply_resource_change(Request::new(pb::apply_resource_change::Request {
                type_name: "constellation_image".into(),
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(summaries(&apply.diagnostics), ["Provider not configured"]);
        let data = p
            .read_data_source(Request::new(pb::read_data_source::Request {
                type_name: "constellation_attestation".into(),
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(summaries(&data.diagnostics), ["Provider not configured"]);

        // After ConfigureProvider, the same import reaches the resource (which refuses `/`
        // as a folder outside import_dirs).
        let configured = p
            .configure_provider(Request::new(Default::default()))
            .await
            .unwrap()
            .into_inner();
        assert!(configured.diagnostics.is_empty());
        let import = p
            .import_resource_state(Request::new(pb::import_resource_state::Request {
                type_name: "constellation_image".into(),
                id: "/".into(),
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            summaries(&import.diagnostics),
            ["Import folder not allowed"]
        );
    }
}
