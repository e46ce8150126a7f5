//! Alerting's record in SQL (see [`crate::alert`]): both dialects, written once.

/// Makes incident `$1`'s row unless it exists.
pub(crate) const INSERT_INCIDENT: &str = "\
INSERT INTO incidents (id, rule, incident_key, severity, class, target, count, triggered_at, resolved_at) \
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, NULL) ON CONFLICT (id) DO NOTHING";

/// Closes incident `$1` at `$2`, unless it is closed.
pub(crate) const CLOSE_INCIDENT: &str =
    "UPDATE incidents SET resolved_at = $2 WHERE id = $1 AND resolved_at IS NULL";

/// One line of a timeline.
pub(crate) const INSERT_INCIDENT_EVENT: &str = "\
INSERT INTO incident_events (incident_id, at, kind, sink, action, detail) VALUES ($1, $2, $3, $4, $5, $6)";

/// Open incidents, latest first, at most `$1`.
pub(crate) const OPEN_INCIDENTS: &str = "\
SELECT id, rule, incident_key, severity, class, target, count, triggered_at, resolved_at FROM incidents \
WHERE resolved_at IS NULL ORDER BY triggered_at DESC, id LIMIT $1";

/// Resolved incidents, latest resolved first, at most `$1`.
pub(crate) const RESOLVED_INCIDENTS: &str = "\
SELECT id, rule, incident_key, severity, class, target, count, triggered_at, resolved_at FROM incidents \
WHERE resolved_at IS NOT NULL ORDER BY resolved_at DESC, id LIMIT $1";

macro_rules! incident_ops {
    ($db:ty, $conn:ty) => {
        pub(super) async fn record_alerts(conn: &mut $conn, records: &[crate::AlertRecord]) -> Result<()> {
            use crate::store::incidents as q;
            for r in records {
                match r.kind.as_str() {
                    "triggered" => {
                        sqlx::query(q::INSERT_INCIDENT)
                            .bind(&r.incident)
                            .bind(&r.rule)
                            .bind(&r.key)
                            .bind(&r.severity)
                            .bind(&r.class)
                            .bind(&r.target)
                            .bind(i64::from(r.count))
                            .bind(r.at_ms)
                            .execute(&mut *conn)
                            .await?;
                    }
                    "resolved" | "cancelled" => {
                        sqlx::query(q::CLOSE_INCIDENT).bind(&r.incident).bind(r.at_ms).execute(&mut *conn).await?;
                    }
                    _ => {}
                }
                sqlx::query(q::INSERT_INCIDENT_EVENT)
                    .bind(&r.incident)
                    .bind(r.at_ms)
                    .bind(&r.kind)
                    .bind(&r.sink)
                    .bind(&r.action)
                    .bind(&r.detail)
                    .execute(&mut *conn)
                    .await?;
            }
            Ok(())
        }

        pub(super) async fn incidents(conn: &mut $conn, limit: u32) -> Result<Vec<crate::IncidentView>> {
            use crate::store::incidents as q;
            let mut views = Vec::new();
            for statement in [q::OPEN_INCIDENTS, q::RESOLVED_INCIDENTS] {
                let rows = sqlx::query(statement).bind(i64::from(limit)).fetch_all(&mut *conn).await?;
                for r in &rows {
                    views.push(crate::IncidentView {
                        id: r.try_get("id")?,
                        rule: r.try_get("rule")?,
                        key: r.try_get("incident_key")?,
                        severity: r.try_get("severity")?,
                        class: r.try_get("class")?,
                        target: r.try_get("target")?,
                        count: u32::try_from(r.try_get::<i64, _>("count")?).unwrap_or(u32::MAX),
                        triggered_at_ms: r.try_get("triggered_at")?,
                        resolved_at_ms: r.try_get("resolved_at")?,
                        timeline: Vec::new(),
                    });
                }
            }
            if views.is_empty() {
                return Ok(views);
            }
            // Every timeline in one statement.
            let mut qb = sqlx::QueryBuilder::<$db>::new(
                "SELECT incident_id, at, kind, sink, action, detail FROM incident_events WHERE incident_id IN (",
            );
            let mut ids = qb.separated(", ");
            for v in &views {
                ids.push_bind(v.id.clone());
            }
            qb.push(") ORDER BY id");
            let rows = qb.build().fetch_all(&mut *conn).await?;
            let at: std::collections::HashMap<String, usize> =
                views.iter().enumerate().map(|(i, v)| (v.id.clone(), i)).collect();
            for r in &rows {
                let id: String = r.try_get("incident_id")?;
                let Some(&i) = at.get(&id) else { continue };
                views[i].timeline.push(crate::IncidentEntry {
                    at_ms: r.try_get("at")?,
                    kind: r.try_get("kind")?,
                    sink: r.try_get("sink")?,
                    action: r.try_get("action")?,
                    detail: r.try_get("detail")?,
                });
            }
            Ok(views)
        }

        /// Incidents resolved before `cutoff` with their timelines, and lines older
        /// than it that belong to no incident (digests').
        pub(super) async fn prune_incidents(conn: &mut $conn, cutoff: i64) -> Result<()> {
            sqlx::query(
                "DELETE FROM incident_events WHERE incident_id IN \
                 (SELECT id FROM incidents WHERE resolved_at < $1)",
            )
            .bind(cutoff)
            .execute(&mut *conn)
            .await?;
            sqlx::query("DELETE FROM incidents WHERE resolved_at < $1").bind(cutoff).execute(&mut *conn).await?;
            sqlx::query(
                "DELETE FROM incident_events WHERE at < $1 AND incident_id NOT IN (SELECT id FROM incidents)",
            )
            .bind(cutoff)
            .execute(&mut *conn)
            .await?;
            Ok(())
        }
    };
}

pub(crate) use incident_ops;
