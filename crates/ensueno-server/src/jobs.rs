//! What a job is: its status, what was asked (the spec stored in SQLite), and
//! what it made (the result stored beside it once it is done).

use ensueno::pipelines::GenerationRequest;
use serde::{Deserialize, Serialize};

/// Where a job is in its life. Stored as the lower-case word.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    Queued,
    Running,
    Done,
    Failed,
    Cancelled,
}

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Done => "done",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "queued" => JobStatus::Queued,
            "running" => JobStatus::Running,
            "done" => JobStatus::Done,
            "failed" => JobStatus::Failed,
            "cancelled" => JobStatus::Cancelled,
            _ => return None,
        })
    }

    /// A job in a final state never changes again.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobStatus::Done | JobStatus::Failed | JobStatus::Cancelled
        )
    }
}

/// Everything the worker needs to run a job, fixed when it is accepted: the
/// seed is drawn then, so a job re-run after a crash makes the same images.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobSpec {
    /// The request as the client sent it (the gallery's "use again" restores it).
    pub request: GenerationRequest,
    /// The style preset applied, if any.
    #[serde(default)]
    pub style: Option<String>,
    /// The prompts after the style template was applied: what the model sees.
    pub prompt: String,
    pub negative_prompt: String,
    /// File name of the stored init image under `DATA_DIR/inputs/` (img2img).
    #[serde(default)]
    pub init_image: Option<String>,
    /// Which API accepted it ("api" or "a1111").
    pub source: String,
}

/// What a finished job made.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobResult {
    /// Image ids; the files are `DATA_DIR/images/<id>.png`.
    pub images: Vec<String>,
    pub seeds: Vec<u64>,
    pub width: usize,
    pub height: usize,
    /// The A1111 `parameters` text of each image (also in its PNG).
    pub infotexts: Vec<String>,
    #[serde(default)]
    pub warnings: Vec<String>,
    pub model: String,
    /// Seconds the generation took.
    pub seconds: f64,
}

/// One row of the `jobs` table.
#[derive(Debug, Clone)]
pub struct JobRow {
    pub id: String,
    pub status: JobStatus,
    pub spec: JobSpec,
    pub created_at: f64,
    pub started_at: Option<f64>,
    pub finished_at: Option<f64>,
    pub error: Option<String>,
    pub result: Option<JobResult>,
}

/// A fresh random job id: 32 lower-case hex digits.
pub fn new_job_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Whether `s` has the shape of a job id (so it can be used in a file name).
pub fn is_job_id(s: &str) -> bool {
    s.len() == 32
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Whether `s` has the shape of an image id, `<job id>-<index>`.
pub fn is_image_id(s: &str) -> bool {
    match s.split_once('-') {
        Some((job, n)) => {
            is_job_id(job) && !n.is_empty() && n.len() <= 4 && n.bytes().all(|b| b.is_ascii_digit())
        }
        None => false,
    }
}

/// Seconds since the Unix epoch.
pub fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_reject_traversal() {
        let id = new_job_id();
        assert!(is_job_id(&id));
        assert!(is_image_id(&format!("{id}-0")));
        for bad in [
            "../etc/passwd",
            "",
            "..",
            &format!("{id}-../x"),
            &format!("{id}/0"),
        ] {
            assert!(!is_image_id(bad), "{bad}");
            assert!(!is_job_id(bad), "{bad}");
        }
    }
}
