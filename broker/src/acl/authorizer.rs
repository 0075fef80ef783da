//! The policy as the MQTT core asks it.

use std::sync::Arc;

use fleet_certs::Role as CertRole;
use fleet_mqtt::{Authorizer, Role, SessionKey};

use super::{Decision, Policy};

/// [`Policy`] answering for sessions: the gateway's own services (role `Internal`) may do
/// anything; every other session is checked as the identity its certificate named (the edge
/// built the key from it, so the id is already a checked certificate id).
#[derive(Debug, Clone)]
pub(crate) struct PolicyAuthorizer(pub(crate) Arc<Policy>);

/// The certificate role of a session; `None` for the gateway's own services.
fn cert_role(role: Role) -> Option<CertRole> {
    match role {
        Role::Device => Some(CertRole::Device),
        Role::Service => Some(CertRole::Service),
        Role::Gateway => Some(CertRole::Gateway),
        Role::Internal => None,
    }
}

impl Authorizer for PolicyAuthorizer {
    fn may_publish(&self, who: &SessionKey, topic: &str) -> bool {
        cert_role(who.role)
            .is_none_or(|role| self.0.check_publish_as(role, &who.id, topic) == Decision::Allow)
    }

    fn may_subscribe(&self, who: &SessionKey, filter: &str) -> bool {
        cert_role(who.role)
            .is_none_or(|role| self.0.check_subscribe_as(role, &who.id, filter) == Decision::Allow)
    }
}
