//! The gateway's side of the chain of trust: hand it a newer root to distribute, read what it
//! distributes. The gateway checks a root by the same rules as a device and cannot forge one:
//! roots are signed offline (`fleetctl trust ...`).

use fleet_proto::v1::{api_request, api_response, GetTrust, PublishRoot, TrustRecord};

use crate::client::{FleetClient, SdkError};

impl FleetClient {
    /// Hands the gateway an encoded SignedRoot to distribute on `fleet/trust/roots`. It is
    /// accepted only as the successor of the newest root the gateway holds (or as its first);
    /// the answer is what the gateway distributes now.
    pub async fn publish_root(&self, signed_root: Vec<u8>) -> Result<TrustRecord, SdkError> {
        self.trust_call(api_request::Body::PublishRoot(PublishRoot { signed_root }))
            .await
    }

    /// The roots the gateway distributes (version 0: none).
    pub async fn trust(&self) -> Result<TrustRecord, SdkError> {
        self.trust_call(api_request::Body::GetTrust(GetTrust {}))
            .await
    }

    async fn trust_call(&self, body: api_request::Body) -> Result<TrustRecord, SdkError> {
        match self.request(body).await? {
            api_response::Body::Trust(r) => Ok(r),
            other => Err(SdkError::Protocol(format!("{other:?}"))),
        }
    }
}
