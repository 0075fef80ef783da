//! Adding targets to a running or finished campaign (`DeployUpdate.add_targets`), through a
//! real gateway over mTLS: the fleet-wide rollout hands each gateway its part of every fleet
//! batch this way.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Api, Peer, TestGateway};
use fleet_proto::signing::UpdateSigner;
use fleet_proto::v1::{
    api_request, api_response, ApiErrorCode, CampaignState, CreateUpdate, DeployUpdate,
    UpdateManifest, UpdatePhase, UpdateProgress, UpdateRecord, UploadChunk,
};
use fleet_proto::Message;

fn add(devices: &[&str]) -> api_request::Body {
    api_request::Body::DeployUpdate(DeployUpdate {
        update_id: "u-1".into(),
        device_ids: devices.iter().map(|d| (*d).to_owned()).collect(),
        add_targets: true,
        ..DeployUpdate::default()
    })
}

async fn update(api: &mut Api, body: api_request::Body) -> UpdateRecord {
    match api.call(body).await {
        api_response::Body::Update(r) => r,
        other => panic!("expected an update record: {other:?}"),
    }
}

async fn refused(api: &mut Api, body: api_request::Body) -> ApiErrorCode {
    match api.call(body).await {
        api_response::Body::Error(e) => e.code(),
        other => panic!("expected a refusal: {other:?}"),
    }
}

fn targets(r: &UpdateRecord) -> Vec<(&str, u32, bool)> {
    r.targets
        .iter()
        .map(|t| (t.device_id.as_str(), t.batch, t.offered))
        .collect()
}

#[tokio::test]
async fn added_targets_form_the_next_batch_of_the_campaign() {
    let gw = TestGateway::start().await;
    let mut api = Api::connect(&gw, "svc-1").await;
    let image = vec![0x5au8; 1024];
    let summary = fleet_proto::chunker::summarize(image.as_slice(), 1024).unwrap();
    let now = fleet_proto::time::now_ms();
    let manifest = UpdateManifest {
        format_version: fleet_proto::manifest::FORMAT_VERSION,
        update_id: "u-1".into(),
        device_class: "pump".into(),
        version: "2.0".into(),
        sequence: 1,
        issued_at_ms: now,
        expires_at_ms: now + 3_600_000,
        components: vec![summary.component("fw")],
        ..UpdateManifest::default()
    };
    let signed = UpdateSigner::generate().sign_manifest(&manifest);
    update(
        &mut api,
        api_request::Body::CreateUpdate(CreateUpdate {
            manifest: Some(signed.clone()),
        }),
    )
    .await;
    match api
        .call(api_request::Body::UploadChunk(UploadChunk {
            update_id: "u-1".into(),
            component: "fw".into(),
            index: 0,
            data: image,
            proof: Vec::new(),
        }))
        .await
    {
        api_response::Body::UploadChunk(_) => {}
        other => panic!("upload: {other:?}"),
    }
    let mut dev1 = Peer::connect(&gw, "dev-1").await;
    dev1.subscribe("devices/dev-1/update/manifest").await;
    let mut dev2 = Peer::connect(&gw, "dev-2").await;
    dev2.subscribe("devices/dev-2/update/manifest").await;

    // Without a campaign, add_targets deploys: its devices are the first batch.
    let r = update(&mut api, add(&["dev-1"])).await;
    assert_eq!(targets(&r), [("dev-1", 0, true)]);
    let offer = dev1.recv_on("devices/dev-1/update/manifest").await;
    assert_eq!(offer.payload, signed.encode_to_vec());
    // A second plain deployment is still refused.
    let again = api_request::Body::DeployUpdate(DeployUpdate {
        update_id: "u-1".into(),
        device_ids: vec!["dev-2".into()],
        ..DeployUpdate::default()
    });
    assert_eq!(refused(&mut api, again).await, ApiErrorCode::Conflict);
    // add_targets takes devices only.
    let with_batch = api_request::Body::DeployUpdate(DeployUpdate {
        update_id: "u-1".into(),
        device_ids: vec!["dev-2".into()],
        batch_size: 1,
        add_targets: true,
        ..DeployUpdate::default()
    });
    assert_eq!(refused(&mut api, with_batch).await, ApiErrorCode::Invalid);
    let other_threshold = api_request::Body::DeployUpdate(DeployUpdate {
        update_id: "u-1".into(),
        device_ids: vec!["dev-2".into()],
        max_failures_percent: 50,
        add_targets: true,
        ..DeployUpdate::default()
    });
    assert_eq!(
        refused(&mut api, other_threshold).await,
        ApiErrorCode::Invalid
    );

    // Added while dev-1 works: a second batch, not offered yet; a retry changes nothing.
    let r = update(&mut api, add(&["dev-1", "dev-2"])).await;
    assert_eq!(targets(&r), [("dev-1", 0, true), ("dev-2", 1, false)]);
    // The campaign's own threshold (100: never pause) may be repeated.
    let same = api_request::Body::DeployUpdate(DeployUpdate {
        update_id: "u-1".into(),
        device_ids: vec!["dev-2".into()],
        max_failures_percent: 100,
        add_targets: true,
        ..DeployUpdate::default()
    });
    let r = update(&mut api, same).await;
    assert_eq!(targets(&r), [("dev-1", 0, true), ("dev-2", 1, false)]);
    assert_eq!(r.campaign.unwrap().batches, 2);

    // dev-1 finishes: dev-2's batch is offered.
    let done = UpdateProgress {
        update_id: "u-1".into(),
        phase: UpdatePhase::Committed.into(),
        running_version: "2.0".into(),
        ..UpdateProgress::default()
    };
    dev1.publish(
        "devices/dev-1/update/progress",
        &done.encode_to_vec(),
        false,
    )
    .await;
    let offer = dev2.recv_on("devices/dev-2/update/manifest").await;
    assert_eq!(offer.payload, signed.encode_to_vec());
    let r = update(
        &mut api,
        api_request::Body::GetUpdate(fleet_proto::v1::GetUpdate {
            update_id: "u-1".into(),
        }),
    )
    .await;
    assert_eq!(targets(&r), [("dev-1", 0, true), ("dev-2", 1, true)]);
    let c = r.campaign.unwrap();
    assert_eq!((c.state(), c.current_batch), (CampaignState::Running, 1));
}
