//! `sagactl reconcile [--repair]`: checks every saga against the
//! participants' records (`AdminService/Reconcile`) and prints the
//! discrepancies; exit status 1 when there are any, even once repaired.

use std::time::Duration;

use common::cli::parse_duration;
use proto::saga::v1 as pb;
use serde_json::{Value, json};

use super::render::{table, truncate};
use super::{Client, Done, Failure, pretty, status_name, text_or_null};

/// Flags of `sagactl reconcile`.
#[derive(Debug, Clone, clap::Args)]
pub struct ReconcileArgs {
    /// Compensate every orphan found (Release, Refund or CancelShipment,
    /// journalled on its saga). A COMPLETED saga's missing or different
    /// record is only reported.
    #[arg(long)]
    pub repair: bool,
    /// Who asks (journalled with each repair).
    #[arg(long, env = "USER", default_value = "operator")]
    pub operator: String,
    /// Most discrepancies listed (all are counted and repaired).
    #[arg(long, default_value_t = 1000)]
    pub limit: i32,
    /// How long the whole check may take (it reads every saga and record).
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub timeout: Duration,
}

fn participant_name(value: i32) -> String {
    pb::Participant::try_from(value)
        .map(|p| {
            p.as_str_name()
                .trim_start_matches("PARTICIPANT_")
                .to_lowercase()
        })
        .unwrap_or_else(|_| value.to_string())
}

fn kind_name(value: i32) -> String {
    pb::DiscrepancyKind::try_from(value)
        .map(|k| {
            k.as_str_name()
                .trim_start_matches("DISCREPANCY_KIND_")
                .to_owned()
        })
        .unwrap_or_else(|_| value.to_string())
}

/// The saga's status, or null (JSON) / "unknown" (table) when the
/// orchestrator has no such saga.
fn saga_status(value: i32) -> Option<String> {
    (value != pb::OrderStatus::Unspecified as i32).then(|| status_name(value))
}

fn reconcile_json(reply: &pb::ReconcileResponse) -> String {
    pretty(&json!({
        "discrepancies": reply.discrepancies.iter().map(|d| json!({
            "saga_id": d.saga_id,
            "participant": participant_name(d.participant),
            "kind": kind_name(d.kind),
            "saga_status": saga_status(d.saga_status).map_or(Value::Null, Value::String),
            "expected": d.expected,
            "found": d.found,
            "detail": d.detail,
            "repaired": d.repaired,
            "repair": text_or_null(&d.repair),
        })).collect::<Vec<_>>(),
        "discrepancies_found": reply.discrepancies_found,
        "sagas_checked": reply.sagas_checked,
        "sagas_skipped": reply.sagas_skipped,
        "reservations_checked": reply.reservations_checked,
        "charges_checked": reply.charges_checked,
        "shipments_checked": reply.shipments_checked,
        "repaired": reply.repaired,
        "repair_failed": reply.repair_failed,
    }))
}

fn reconcile_text(reply: &pb::ReconcileResponse, repair: bool) -> String {
    let mut text = String::new();
    if !reply.discrepancies.is_empty() {
        let rows: Vec<Vec<String>> = reply
            .discrepancies
            .iter()
            .map(|d| {
                let mut row = vec![
                    d.saga_id.clone(),
                    participant_name(d.participant),
                    kind_name(d.kind),
                    saga_status(d.saga_status).unwrap_or_else(|| "unknown".into()),
                    truncate(&d.expected, 40),
                    truncate(&d.found, 40),
                ];
                if repair {
                    row.push(if d.repair.is_empty() {
                        "-".into()
                    } else {
                        truncate(&d.repair, 80)
                    });
                } else {
                    row.push(truncate(&d.detail, 80));
                }
                row
            })
            .collect();
        let last = if repair { "REPAIR" } else { "DETAIL" };
        text.push_str(&table(
            &[
                "SAGA",
                "PARTICIPANT",
                "KIND",
                "SAGA STATUS",
                "EXPECTED",
                "FOUND",
                last,
            ],
            &rows,
        ));
        text.push('\n');
    }
    text.push_str(&format!(
        "checked {} sagas ({} skipped: in flight or NEEDS_ATTENTION), {} reservations, {} charges, {} shipments\n",
        reply.sagas_checked,
        reply.sagas_skipped,
        reply.reservations_checked,
        reply.charges_checked,
        reply.shipments_checked
    ));
    if reply.discrepancies_found == 0 {
        text.push_str("no discrepancies\n");
        return text;
    }
    text.push_str(&format!("{} discrepancies", reply.discrepancies_found));
    if (reply.discrepancies.len() as i64) < reply.discrepancies_found {
        text.push_str(&format!(
            " ({} listed; see --limit)",
            reply.discrepancies.len()
        ));
    }
    text.push('\n');
    let orphans = reply
        .discrepancies
        .iter()
        .filter(|d| d.kind == pb::DiscrepancyKind::Orphan as i32)
        .count();
    if repair {
        text.push_str(&format!("repaired {} orphans", reply.repaired));
        if reply.repair_failed > 0 {
            text.push_str(&format!(
                "; {} repairs failed (run again)",
                reply.repair_failed
            ));
        }
        text.push_str("; missing and mismatched records are reported only\n");
    } else if orphans > 0 {
        text.push_str("compensate the orphans with: sagactl reconcile --repair\n");
    }
    text
}

/// Runs `sagactl reconcile`.
pub(super) async fn run(
    endpoint: &str,
    token: Option<common::cli::Secret>,
    tls: Option<&common::tls::Client>,
    args: ReconcileArgs,
    json_out: bool,
) -> Result<Done, Failure> {
    let client = Client::connect_with_timeout(endpoint, token, tls, args.timeout).await?;
    let reply = client
        .admin
        .clone()
        .reconcile(client.request(pb::ReconcileRequest {
            repair: args.repair,
            operator: args.operator,
            limit: args.limit,
            page_size: 0,
        })?)
        .await
        .map_err(|s| client.fail(s))?
        .into_inner();
    let stdout = if json_out {
        reconcile_json(&reply)
    } else {
        reconcile_text(&reply, args.repair)
    };
    Ok(Done {
        stdout,
        code: u8::from(reply.discrepancies_found > 0),
    })
}
