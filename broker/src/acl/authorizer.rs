//! The policy as the MQTT core asks it.

use std::sync::Arc;

use fleet_certs::{Identity, Role as CertRole};
use fleet_mqtt::{Authorizer, Role, SessionKey};

use super::{Decision, Policy};

/// [`Policy`] answering for sessions: the gateway's own services (role `Internal`) may do
/// anything; every other session is checked as the identity its certificate named.
#[derive(Debug, Clone)]
pub(crate) struct PolicyAuthorizer(pub(crate) Arc<Policy>);

fn identity(key: &SessionKey) -> Option<Identity> {
    let role = match key.role {
        Role::Device => CertRole::Device,
        Role::Service => CertRole::Service,
        Role::Gateway => CertRole::Gateway,
        Role::Internal => return None,
    };
    // The edge built the key from a certificate's identity, so this does not fail; if it
    // ever did, nothing is allowed.
    Identity::new(role, key.id.clone()).ok()
}

impl Authorizer for PolicyAuthorizer {
    fn may_publish(&self, who: &SessionKey, topic: &str) -> bool {
        if who.role == Role::Internal {
            return true;
        }
        identity(who).is_some_and(|i| self.0.check_publish(&i, topic) == Decision::Allow)
    }

    fn may_subscribe(&self, who: &SessionKey, filter: &str) -> bool {
        if who.role == Role::Internal {
            return true;
        }
        identity(who).is_some_and(|i| self.0.check_subscribe(&i, filter) == Decision::Allow)
    }
}
