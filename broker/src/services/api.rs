//! The fleet API on `fleet/api/{service_id}/request`: requests are decoded and checked here,
//! answered on `fleet/api/{service_id}/response`. Validation is pure ([`plan_send`]); the
//! handlers run on the command service's task, which owns the link and the set of connected
//! devices.

use std::collections::{BTreeMap, BTreeSet};

use fleet_proto::ids::validate_id;
use fleet_proto::topics;
use fleet_proto::v1::{
    api_request, api_response, ApiError, ApiErrorCode, ApiRequest, ApiResponse, Command,
    CommandState, DeviceStatus, GetCommand, GetCommandResponse, GetStatus, GetStatusResponse,
    Presence, SendCommand, SendCommandResponse, Signature, StatusReport, TrustReport,
};
use fleet_proto::Message;
use rand_core::RngCore;
use tracing::{info, warn};

use super::commands::{to_record, CommandService};
use super::updates::ApiCall;
use crate::config::CommandSettings;
use crate::metrics::Metrics;
use crate::store::{StoredCommand, Submitted};

/// Longest command name accepted, in bytes.
pub(crate) const MAX_NAME_LEN: usize = 256;
/// Most target devices in one request.
pub(crate) const MAX_TARGETS: usize = 10_000;

/// An error answer.
pub(crate) fn api_error(code: ApiErrorCode, message: impl Into<String>) -> ApiError {
    ApiError {
        code: code.into(),
        message: message.into(),
    }
}

/// A fresh command id: `cmd-` and 16 random hex digits.
fn new_command_id() -> String {
    let mut b = [0u8; 8];
    rand_core::OsRng.fill_bytes(&mut b);
    format!("cmd-{}", hex::encode(b))
}

/// What an unsigned SendCommand is refused with when the gateway takes signed commands only.
pub(crate) const UNSIGNED_REFUSED: &str = "unsigned command refused: commands must be signed by \
     the commands role of the fleet's root of trust (send SendCommand.signed); this gateway \
     does not accept unsigned commands (commands.allow_unsigned = false)";

/// One SignedCommand of a request whose shape has been checked (its signatures are the
/// devices' business).
#[derive(Debug, Clone)]
pub(crate) struct CheckedSigned {
    /// The Command decoded from `bytes`.
    pub command: Command,
    /// The Command bytes exactly as signed.
    pub bytes: Vec<u8>,
    /// The signatures, as given.
    pub signatures: Vec<Signature>,
}

/// Checks the shape of a signed SendCommand: every SignedCommand within its bounds (encoded
/// size, 1 to `MAX_SIGNATURES` signatures), its Command decodes with a valid id (the same in
/// all, and equal to `req.command_id` if that is set), exactly one of a valid device id and a
/// device class, an expiry after `now_ms`, a name of 1 to [`MAX_NAME_LEN`] bytes; and fields 2
/// to 6 of the request empty. Signatures are not checked: the gateway holds no root it could
/// trust more than the devices do, and the devices check them.
pub(crate) fn check_signed(req: &SendCommand, now_ms: u64) -> Result<Vec<CheckedSigned>, ApiError> {
    let invalid = |m: String| api_error(ApiErrorCode::Invalid, m);
    if !req.device_ids.is_empty()
        || !req.device_class.is_empty()
        || !req.name.is_empty()
        || !req.payload.is_empty()
        || req.ttl_ms != 0
    {
        return Err(invalid(
            "a signed SendCommand carries everything in `signed`: device_ids, device_class, \
             name, payload and ttl_ms must be empty"
                .into(),
        ));
    }
    if req.signed.len() > MAX_TARGETS {
        return Err(invalid(format!("more than {MAX_TARGETS} signed commands")));
    }
    let mut out: Vec<CheckedSigned> = Vec::with_capacity(req.signed.len());
    for (i, sc) in req.signed.iter().enumerate() {
        let len = sc.encoded_len();
        if len > fleet_proto::command::MAX_SIGNED_COMMAND_LEN {
            return Err(invalid(format!(
                "signed[{i}]: {len} bytes; at most {} are accepted",
                fleet_proto::command::MAX_SIGNED_COMMAND_LEN
            )));
        }
        if sc.signatures.is_empty() {
            return Err(invalid(format!(
                "signed[{i}]: no signature; commands must be signed by the commands role"
            )));
        }
        if sc.signatures.len() > fleet_proto::limits::MAX_SIGNATURES {
            return Err(invalid(format!(
                "signed[{i}]: {} signatures; at most {}",
                sc.signatures.len(),
                fleet_proto::limits::MAX_SIGNATURES
            )));
        }
        let c = Command::decode(sc.command.as_slice()).map_err(|e| {
            invalid(format!(
                "signed[{i}]: command is not a fleet.v1.Command: {e}"
            ))
        })?;
        validate_id(&c.command_id).map_err(|e| invalid(format!("signed[{i}]: command_id: {e}")))?;
        let first = out
            .first()
            .map(|f| f.command.command_id.as_str())
            .unwrap_or(if req.command_id.is_empty() {
                c.command_id.as_str()
            } else {
                req.command_id.as_str()
            });
        if c.command_id != first {
            return Err(invalid(format!(
                "signed[{i}]: command id {:?} differs from {first:?}; one request is one command",
                c.command_id
            )));
        }
        match (c.device_id.is_empty(), c.device_class.is_empty()) {
            (false, true) => validate_id(&c.device_id)
                .map_err(|e| invalid(format!("signed[{i}]: device id {:?}: {e}", c.device_id)))?,
            (true, false) => {}
            _ => {
                return Err(invalid(format!(
                    "signed[{i}]: exactly one of device_id and device_class must be set"
                )))
            }
        }
        if c.expires_at_ms == 0 {
            return Err(invalid(format!(
                "signed[{i}]: no expiry (expires_at_ms); a signed command must expire"
            )));
        }
        if c.expires_at_ms <= now_ms {
            return Err(invalid(format!(
                "signed[{i}]: expired at {} (now {now_ms})",
                c.expires_at_ms
            )));
        }
        if c.name.is_empty() || c.name.len() > MAX_NAME_LEN {
            return Err(invalid(format!(
                "signed[{i}]: name must be 1 to {MAX_NAME_LEN} bytes"
            )));
        }
        out.push(CheckedSigned {
            command: c,
            bytes: sc.command.clone(),
            signatures: sc.signatures.clone(),
        });
    }
    if out.is_empty() {
        return Err(invalid("no signed command".into()));
    }
    Ok(out)
}

/// Turns checked signed commands into one stored command per target device: a command for a
/// device goes to that device, a command for a class to every known member (`members`, looked
/// up by the caller for each class named). A device targeted twice is refused.
pub(crate) fn plan_signed(
    checked: Vec<CheckedSigned>,
    members: &BTreeMap<String, Vec<String>>,
    service: &str,
    now_ms: u64,
) -> Result<Vec<StoredCommand>, ApiError> {
    let mut by_device: BTreeMap<String, StoredCommand> = BTreeMap::new();
    for c in checked {
        let targets = if c.command.device_id.is_empty() {
            let class = &c.command.device_class;
            match members.get(class) {
                Some(m) if !m.is_empty() => m.clone(),
                _ => {
                    return Err(api_error(
                        ApiErrorCode::NotFound,
                        format!("no known device of class {class:?}"),
                    ))
                }
            }
        } else {
            vec![c.command.device_id.clone()]
        };
        for device_id in targets {
            let stored = StoredCommand {
                command_id: c.command.command_id.clone(),
                name: c.command.name.clone(),
                payload: c.command.payload.clone(),
                issued_by: service.to_owned(),
                issued_at_ms: now_ms,
                expires_at_ms: c.command.expires_at_ms,
                attempts: 0,
                state: CommandState::Pending,
                result: None,
                updated_at_ms: now_ms,
                command: c.bytes.clone(),
                signatures: c.signatures.clone(),
                not_before_ms: c.command.not_before_ms,
                device_id: device_id.clone(),
            };
            if by_device.insert(device_id.clone(), stored).is_some() {
                return Err(api_error(
                    ApiErrorCode::Invalid,
                    format!("two signed commands of the request are for device {device_id:?}"),
                ));
            }
        }
    }
    if by_device.len() > MAX_TARGETS {
        return Err(api_error(
            ApiErrorCode::Invalid,
            format!("more than {MAX_TARGETS} targets"),
        ));
    }
    Ok(by_device.into_values().collect())
}

/// Checks an unsigned SendCommand (accepted only with `commands.allow_unsigned`) and turns it
/// into one command per target, each delivered as a SignedCommand without signatures.
/// `class_members` are the known devices of `req.device_class` (looked up by the caller).
pub(crate) fn plan_send(
    req: &SendCommand,
    service: &str,
    class_members: &[String],
    settings: &CommandSettings,
    now_ms: u64,
) -> Result<Vec<StoredCommand>, ApiError> {
    let invalid = |m: String| api_error(ApiErrorCode::Invalid, m);
    if req.name.is_empty() || req.name.len() > MAX_NAME_LEN {
        return Err(invalid(format!("name must be 1 to {MAX_NAME_LEN} bytes")));
    }
    let command_id = if req.command_id.is_empty() {
        new_command_id()
    } else {
        validate_id(&req.command_id).map_err(|e| invalid(format!("command_id: {e}")))?;
        req.command_id.clone()
    };
    let mut targets = BTreeSet::new();
    for d in &req.device_ids {
        validate_id(d).map_err(|e| invalid(format!("device id {d:?}: {e}")))?;
        targets.insert(d.clone());
    }
    if !req.device_class.is_empty() {
        if class_members.is_empty() && targets.is_empty() {
            return Err(api_error(
                ApiErrorCode::NotFound,
                format!("no known device of class {:?}", req.device_class),
            ));
        }
        targets.extend(class_members.iter().cloned());
    }
    if targets.is_empty() {
        return Err(invalid(
            "no target: give device_ids or a device_class".into(),
        ));
    }
    if targets.len() > MAX_TARGETS {
        return Err(invalid(format!("more than {MAX_TARGETS} targets")));
    }
    let max = u64::try_from(settings.max_ttl.as_millis()).unwrap_or(u64::MAX);
    let ttl = match req.ttl_ms {
        0 => u64::try_from(settings.default_ttl.as_millis()).unwrap_or(u64::MAX),
        t => t.min(max),
    };
    let expires_at_ms = now_ms.saturating_add(ttl);
    Ok(targets
        .into_iter()
        .map(|device_id| StoredCommand {
            command: Command {
                command_id: command_id.clone(),
                name: req.name.clone(),
                payload: req.payload.clone(),
                issued_at_ms: now_ms,
                expires_at_ms,
                issued_by: service.to_owned(),
                device_id: device_id.clone(),
                device_class: String::new(),
                not_before_ms: 0,
            }
            .encode_to_vec(),
            signatures: Vec::new(),
            not_before_ms: 0,
            device_id,
            command_id: command_id.clone(),
            name: req.name.clone(),
            payload: req.payload.clone(),
            issued_by: service.to_owned(),
            issued_at_ms: now_ms,
            expires_at_ms,
            attempts: 0,
            state: CommandState::Pending,
            result: None,
            updated_at_ms: now_ms,
        })
        .collect())
}

/// The topic and bytes of a response to `service`.
pub(crate) fn response(
    service: &str,
    request_id: String,
    body: api_response::Body,
) -> (String, Vec<u8>) {
    let r = ApiResponse {
        request_id,
        body: Some(body),
    };
    (topics::api_response_topic(service), r.encode_to_vec())
}

impl CommandService {
    /// Answers one request from `service` (the id in its request topic, which the ACL binds to
    /// its certificate).
    pub(super) async fn on_request(&mut self, service: &str, payload: &[u8]) {
        let (request_id, body) = match ApiRequest::decode(payload) {
            Ok(r) => (r.request_id, r.body),
            Err(e) => {
                if let Some(suppressed) = self.metrics.malformed_payload() {
                    warn!(service, error = %e, suppressed, "API request: bad protobuf");
                }
                self.respond(
                    service,
                    String::new(),
                    api_response::Body::Error(api_error(
                        ApiErrorCode::Invalid,
                        format!("request is not a fleet.v1.ApiRequest: {e}"),
                    )),
                );
                return;
            }
        };
        let answer = match body {
            None => {
                Metrics::inc(&self.metrics.malformed_payloads);
                Err(api_error(ApiErrorCode::Invalid, "request has no body"))
            }
            Some(api_request::Body::SendCommand(req)) => self
                .send_command(service, req)
                .await
                .map(api_response::Body::SendCommand),
            Some(api_request::Body::GetCommand(req)) => self
                .get_command(req)
                .await
                .map(api_response::Body::GetCommand),
            Some(api_request::Body::GetStatus(req)) => self
                .get_status(req)
                .await
                .map(api_response::Body::GetStatus),
            Some(body) => {
                // The update server answers update requests itself, the trust service trust
                // requests.
                let trust = matches!(
                    body,
                    api_request::Body::PublishRoot(_) | api_request::Body::GetTrust(_)
                );
                let call = ApiCall {
                    service: service.to_owned(),
                    request_id,
                    body,
                };
                let sent = if trust {
                    self.trust.send(call)
                } else {
                    self.updates.send(call)
                };
                if let Err(e) = sent {
                    warn!(service, "a service is gone; request dropped");
                    let call = e.0;
                    self.respond(
                        service,
                        call.request_id,
                        api_response::Body::Error(api_error(
                            ApiErrorCode::Unavailable,
                            "the service answering this request has stopped",
                        )),
                    );
                }
                return;
            }
        };
        let body = answer.unwrap_or_else(api_response::Body::Error);
        self.respond(service, request_id, body);
    }

    fn respond(&mut self, service: &str, request_id: String, body: api_response::Body) {
        let (topic, bytes) = response(service, request_id, body);
        if let Err(e) = self.link.publish(topic, bytes) {
            warn!(service, error = %e, "could not publish an API response");
        }
    }

    fn unavailable() -> ApiError {
        api_error(
            ApiErrorCode::Unavailable,
            "the gateway's store failed; see its log",
        )
    }

    async fn send_command(
        &mut self,
        service: &str,
        req: SendCommand,
    ) -> Result<SendCommandResponse, ApiError> {
        let now = fleet_proto::time::now_ms();
        let planned = if !req.signed.is_empty() {
            let checked = check_signed(&req, now)?;
            let classes: BTreeSet<String> = checked
                .iter()
                .filter(|c| c.command.device_id.is_empty())
                .map(|c| c.command.device_class.clone())
                .collect();
            let members = self
                .store
                .call("devices of class", move |s| {
                    classes
                        .into_iter()
                        .map(|c| Ok((c.clone(), s.devices_of_class(&c)?)))
                        .collect::<Result<BTreeMap<_, _>, _>>()
                })
                .await
                .map_err(|_| Self::unavailable())?;
            plan_signed(checked, &members, service, now)?
        } else if !self.settings.allow_unsigned {
            Metrics::inc(&self.metrics.commands_unsigned_refused);
            return Err(api_error(ApiErrorCode::Invalid, UNSIGNED_REFUSED));
        } else {
            let class = req.device_class.clone();
            let members = if class.is_empty() {
                Vec::new()
            } else {
                self.store
                    .call("devices of class", move |s| s.devices_of_class(&class))
                    .await
                    .map_err(|_| Self::unavailable())?
            };
            plan_send(&req, service, &members, &self.settings, now)?
        };
        let command_id = planned
            .first()
            .map(|c| c.command_id.clone())
            .unwrap_or_default();
        let max_open = self.settings.max_open_per_device;
        let outcomes = self
            .store
            .call("submit commands", move |s| {
                let targets: Vec<String> = planned.iter().map(|c| c.device_id.clone()).collect();
                let full: Vec<String> = s
                    .open_counts(&targets)?
                    .into_iter()
                    .zip(targets)
                    .filter(|(n, _)| *n >= max_open)
                    .map(|(_, d)| d)
                    .collect();
                if !full.is_empty() {
                    return Ok(Err(full));
                }
                s.submit_commands(&planned).map(Ok)
            })
            .await
            .map_err(|_| Self::unavailable())?
            .map_err(|full| {
                api_error(
                    ApiErrorCode::Limit,
                    format!(
                        "{} device(s) already have {max_open} open commands (first: {}); \
                         retry when some have finished or expired",
                        full.len(),
                        full.first().map_or("", String::as_str)
                    ),
                )
            })?;
        if let Some(Submitted::Conflict(old)) = outcomes
            .iter()
            .find(|o| matches!(o, Submitted::Conflict(_)))
        {
            return Err(api_error(
                ApiErrorCode::Conflict,
                format!(
                    "command id {:?} is already used on {} for a different command",
                    old.command_id, old.device_id
                ),
            ));
        }
        let mut records = Vec::with_capacity(outcomes.len());
        for o in outcomes {
            match o {
                Submitted::New(c) => {
                    Metrics::inc(&self.metrics.commands_submitted);
                    // Its expiry may come before anything scheduled.
                    self.reschedule = true;
                    info!(service, device = %c.device_id, command_id = %c.command_id, name = %c.name, expires_at_ms = c.expires_at_ms, "command accepted");
                    self.event(&c);
                    records.push(to_record(&c));
                    if self.online.contains(&c.device_id) {
                        self.deliver(c).await;
                    }
                }
                Submitted::Existing(c) | Submitted::Conflict(c) => records.push(to_record(&c)),
            }
        }
        Ok(SendCommandResponse {
            command_id,
            commands: records,
        })
    }

    async fn get_command(&mut self, req: GetCommand) -> Result<GetCommandResponse, ApiError> {
        validate_id(&req.command_id)
            .map_err(|e| api_error(ApiErrorCode::Invalid, format!("command_id: {e}")))?;
        let device = (!req.device_id.is_empty()).then_some(req.device_id.clone());
        let id = req.command_id.clone();
        let found = self
            .store
            .call("get command", move |s| {
                s.get_command(&id, device.as_deref())
            })
            .await
            .map_err(|_| Self::unavailable())?;
        if found.is_empty() {
            return Err(api_error(
                ApiErrorCode::NotFound,
                format!("no command {:?}", req.command_id),
            ));
        }
        Ok(GetCommandResponse {
            commands: found.iter().map(to_record).collect(),
        })
    }

    async fn get_status(&mut self, req: GetStatus) -> Result<GetStatusResponse, ApiError> {
        let wanted: BTreeSet<String> = req.device_ids.into_iter().collect();
        let states = self
            .store
            .call("device states", |s| s.device_states())
            .await
            .map_err(|_| Self::unavailable())?;
        let devices = states
            .into_iter()
            .filter(|s| wanted.is_empty() || wanted.contains(&s.device_id))
            .map(|s| {
                let (last_report, report_received_at_ms) = match &s.status {
                    Some((_, bytes, at)) => (StatusReport::decode(bytes.as_slice()).ok(), *at),
                    None => (None, 0),
                };
                let (presence, presence_received_at_ms) = match &s.presence {
                    Some((bytes, at)) => (Presence::decode(bytes.as_slice()).ok(), *at),
                    None => (None, 0),
                };
                DeviceStatus {
                    trust: s
                        .trust
                        .as_ref()
                        .and_then(|(b, _)| TrustReport::decode(b.as_slice()).ok()),
                    connected: self.online.contains(&s.device_id),
                    device_id: s.device_id,
                    last_report,
                    report_received_at_ms,
                    presence,
                    presence_received_at_ms,
                    reports_stored: s.reports_stored,
                }
            })
            .collect();
        Ok(GetStatusResponse { devices })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send(ids: &[&str], class: &str) -> SendCommand {
        SendCommand {
            device_ids: ids.iter().map(|s| s.to_string()).collect(),
            device_class: class.into(),
            name: "reboot".into(),
            ..SendCommand::default()
        }
    }

    #[test]
    fn plans_one_command_per_distinct_target() {
        let s = CommandSettings::default();
        let members = vec!["dev-2".to_string(), "dev-3".to_string()];
        let planned = plan_send(
            &send(&["dev-1", "dev-2"], "pump"),
            "svc-1",
            &members,
            &s,
            1_000,
        )
        .unwrap_or_else(|e| panic!("{e:?}"));
        let devs: Vec<_> = planned.iter().map(|c| c.device_id.as_str()).collect();
        assert_eq!(devs, ["dev-1", "dev-2", "dev-3"]);
        assert!(planned.iter().all(|c| c.command_id == planned[0].command_id
            && c.command_id.starts_with("cmd-")
            && c.issued_by == "svc-1"
            && c.expires_at_ms == 1_000 + 3_600_000));
    }

    #[test]
    fn ttl_is_capped_and_defaulted() {
        let s = CommandSettings::default();
        let mut r = send(&["dev-1"], "");
        r.ttl_ms = u64::MAX;
        let c = plan_send(&r, "svc", &[], &s, 5).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(c[0].expires_at_ms, 5 + 7 * 24 * 3_600_000);
        r.ttl_ms = 2_000;
        let c = plan_send(&r, "svc", &[], &s, 5).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(c[0].expires_at_ms, 2_005);
    }

    fn signed(f: impl FnOnce(&mut Command)) -> fleet_proto::v1::SignedCommand {
        let mut c = Command {
            command_id: "c-1".into(),
            name: "reboot".into(),
            expires_at_ms: 10_000,
            device_id: "dev-1".into(),
            ..Command::default()
        };
        f(&mut c);
        fleet_proto::v1::SignedCommand {
            command: c.encode_to_vec(),
            signatures: vec![Signature::default()],
            ..Default::default()
        }
    }

    fn send_signed(cmds: Vec<fleet_proto::v1::SignedCommand>) -> SendCommand {
        SendCommand {
            signed: cmds,
            ..SendCommand::default()
        }
    }

    #[test]
    fn signed_commands_are_checked_for_shape_and_planned_per_device() {
        let ok = send_signed(vec![
            signed(|_| {}),
            signed(|c| {
                c.device_id.clear();
                c.device_class = "pump".into();
            }),
        ]);
        let checked = check_signed(&ok, 1_000).unwrap_or_else(|e| panic!("{e:?}"));
        let members = BTreeMap::from([(
            "pump".to_string(),
            vec!["dev-2".to_string(), "dev-3".to_string()],
        )]);
        let planned = plan_signed(checked.clone(), &members, "svc-1", 1_000)
            .unwrap_or_else(|e| panic!("{e:?}"));
        let devs: Vec<_> = planned.iter().map(|c| c.device_id.as_str()).collect();
        assert_eq!(devs, ["dev-1", "dev-2", "dev-3"]);
        // The class command's bytes go to each member unchanged, with the command's expiry.
        assert_eq!(planned[1].command, ok.signed[1].command);
        assert!(planned
            .iter()
            .all(|c| c.expires_at_ms == 10_000 && c.issued_by == "svc-1"));
        // A class nobody is known in; a device targeted twice.
        assert_eq!(
            plan_signed(checked.clone(), &BTreeMap::new(), "svc", 0)
                .map_err(|e| e.code())
                .err(),
            Some(ApiErrorCode::NotFound)
        );
        let twice = BTreeMap::from([("pump".to_string(), vec!["dev-1".to_string()])]);
        assert_eq!(
            plan_signed(checked, &twice, "svc", 0)
                .map_err(|e| e.code())
                .err(),
            Some(ApiErrorCode::Invalid)
        );
    }

    #[test]
    fn malformed_signed_commands_are_refused() {
        let refused = |r: SendCommand| check_signed(&r, 1_000).map(|_| ()).map_err(|e| e.code());
        let bad: Vec<SendCommand> = vec![
            send_signed(vec![]),
            send_signed(vec![signed(|c| c.expires_at_ms = 0)]),
            send_signed(vec![signed(|c| c.expires_at_ms = 1_000)]),
            send_signed(vec![signed(|c| c.device_class = "pump".into())]),
            send_signed(vec![signed(|c| c.device_id.clear())]),
            send_signed(vec![signed(|c| c.device_id = "a/b".into())]),
            send_signed(vec![signed(|c| c.command_id = "x#y".into())]),
            send_signed(vec![
                signed(|_| {}),
                signed(|c| c.command_id = "c-2".into()),
            ]),
            send_signed(vec![signed(|c| c.name.clear())]),
            {
                let mut r = send_signed(vec![signed(|_| {})]);
                r.signed[0].signatures.clear();
                r
            },
            {
                let mut r = send_signed(vec![signed(|_| {})]);
                r.signed[0].signatures = vec![Signature::default(); 9];
                r
            },
            {
                let mut r = send_signed(vec![signed(|_| {})]);
                r.signed[0].command = b"not protobuf".to_vec();
                r
            },
            {
                let mut r = send_signed(vec![signed(|c| c.payload = vec![0; 256 * 1024])]);
                r.command_id = "c-1".into();
                r
            },
            {
                let mut r = send_signed(vec![signed(|_| {})]);
                r.name = "reboot".into();
                r
            },
            {
                let mut r = send_signed(vec![signed(|_| {})]);
                r.command_id = "other".into();
                r
            },
        ];
        for (i, r) in bad.into_iter().enumerate() {
            assert_eq!(refused(r), Err(ApiErrorCode::Invalid), "case {i}");
        }
        assert_eq!(refused(send_signed(vec![signed(|_| {})])), Ok(()));
    }

    #[test]
    fn bad_requests_are_refused_with_a_reason() {
        let s = CommandSettings::default();
        let code = |r: SendCommand, members: &[String]| {
            plan_send(&r, "svc", members, &s, 0)
                .map(|_| ())
                .map_err(|e| e.code())
        };
        assert_eq!(code(send(&[], ""), &[]), Err(ApiErrorCode::Invalid));
        assert_eq!(code(send(&[], "pump"), &[]), Err(ApiErrorCode::NotFound));
        assert_eq!(code(send(&["a/b"], ""), &[]), Err(ApiErrorCode::Invalid));
        let mut r = send(&["dev-1"], "");
        r.name.clear();
        assert_eq!(code(r, &[]), Err(ApiErrorCode::Invalid));
        let mut r = send(&["dev-1"], "");
        r.command_id = "x#y".into();
        assert_eq!(code(r, &[]), Err(ApiErrorCode::Invalid));
        assert_eq!(code(send(&["dev-1"], ""), &[]), Ok(()));
    }
}
