//! The engine side: worker threads that own a pipeline each, take jobs from
//! the [`Store`] in order, report progress (step, ETA, a preview image) to
//! whoever listens, write the images and record the outcome.
//!
//! The HTTP side talks to the workers only through [`Engine`]: it wakes them
//! when a job is queued, reads live progress, subscribes to job events and
//! raises a job's cancel flag.

use std::collections::HashMap;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use base64::Engine as _;
use ensueno::io::png_info::{save_png_with_parameters, PngParameters};
use ensueno::pipelines::latent_preview::LatentPreviewer;
use ensueno::pipelines::{GenerationInputs, Limits, StableDiffusionPipeline, StepProgress};
use tokio::sync::broadcast;

use crate::jobs::{JobResult, JobRow, JobStatus};
use crate::store::Store;

/// Something that happened to a job, sent to every subscriber.
#[derive(Debug, Clone)]
pub enum JobEvent {
    /// A denoising step finished.
    Progress {
        id: String,
        step: usize,
        total: usize,
        /// Seconds left, estimated from the steps so far.
        eta: f64,
        /// A small PNG of what the image looks like now, base64.
        preview: Option<Arc<str>>,
    },
    /// The job changed status.
    Status {
        id: String,
        status: JobStatus,
        error: Option<String>,
    },
}

impl JobEvent {
    pub fn id(&self) -> &str {
        match self {
            JobEvent::Progress { id, .. } | JobEvent::Status { id, .. } => id,
        }
    }
}

/// A running job as `/progress` and the job page see it.
#[derive(Debug, Clone)]
pub struct Live {
    pub step: usize,
    pub total: usize,
    pub started: Instant,
    pub preview: Option<Arc<str>>,
    pub cancel: Arc<AtomicBool>,
}

impl Live {
    /// Fraction done, 0..1.
    pub fn fraction(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.step as f64 / self.total as f64
        }
    }
    /// Seconds left, from the pace so far.
    pub fn eta(&self) -> f64 {
        if self.step == 0 {
            return 0.0;
        }
        let per_step = self.started.elapsed().as_secs_f64() / self.step as f64;
        per_step * (self.total.saturating_sub(self.step)) as f64
    }
}

/// What the HTTP handlers and the workers share.
pub struct Engine {
    pub store: Arc<Store>,
    pub data_dir: PathBuf,
    pub limits: Limits,
    pub workers: usize,
    live: Mutex<HashMap<String, Live>>,
    events: broadcast::Sender<JobEvent>,
    wake: Condvar,
    wake_generation: Mutex<u64>,
    shutdown: AtomicBool,
    /// Mean seconds per job (an exponential average, in f64 bits), for Retry-After.
    mean_job_seconds: AtomicU64,
}

impl Engine {
    pub fn new(store: Arc<Store>, data_dir: PathBuf, limits: Limits, workers: usize) -> Self {
        let (events, _) = broadcast::channel(256);
        Self {
            store,
            data_dir,
            limits,
            workers,
            live: Mutex::new(HashMap::new()),
            events,
            wake: Condvar::new(),
            wake_generation: Mutex::new(0),
            shutdown: AtomicBool::new(false),
            mean_job_seconds: AtomicU64::new(1.0f64.to_bits()),
        }
    }

    pub fn images_dir(&self) -> PathBuf {
        self.data_dir.join("images")
    }
    pub fn inputs_dir(&self) -> PathBuf {
        self.data_dir.join("inputs")
    }

    fn live_map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Live>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tells idle workers a job is waiting.
    pub fn notify(&self) {
        let mut g = self
            .wake_generation
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        *g = g.wrapping_add(1);
        self.wake.notify_all();
    }

    fn generation(&self) -> u64 {
        *self
            .wake_generation
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn wait_for_work(&self, seen: u64, timeout: Duration) {
        let g = self
            .wake_generation
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if *g != seen || self.shutdown.load(Ordering::SeqCst) {
            return;
        }
        let _ = self.wake.wait_timeout(g, timeout);
    }

    /// Asks the workers to stop; a running job goes back to the queue.
    pub fn shut_down(&self) {
        self.shutdown.store(true, Ordering::SeqCst);
        self.notify();
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutdown.load(Ordering::SeqCst)
    }

    pub fn subscribe(&self) -> broadcast::Receiver<JobEvent> {
        self.events.subscribe()
    }

    fn emit(&self, event: JobEvent) {
        // No subscriber is not an error.
        let _ = self.events.send(event);
    }

    /// The running jobs (id, progress).
    pub fn live(&self) -> Vec<(String, Live)> {
        self.live_map()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    pub fn live_job(&self, id: &str) -> Option<Live> {
        self.live_map().get(id).cloned()
    }

    /// Cancels a job: a queued one at once (returns `Cancelled`), a running
    /// one at its next step (returns `Running`: it is still running now).
    /// `None` if it had already finished.
    pub fn cancel(&self, id: &str) -> anyhow::Result<Option<JobStatus>> {
        // Under the live lock, so a worker cannot claim the job in between.
        let live = self.live_map();
        if self.store.cancel_queued(id)? {
            drop(live);
            self.emit(JobEvent::Status {
                id: id.to_string(),
                status: JobStatus::Cancelled,
                error: None,
            });
            return Ok(Some(JobStatus::Cancelled));
        }
        if let Some(job) = live.get(id) {
            job.cancel.store(true, Ordering::SeqCst);
            return Ok(Some(JobStatus::Running));
        }
        Ok(None)
    }

    /// Cancels every running job (A1111's `/interrupt`); returns how many.
    pub fn interrupt_running(&self) -> usize {
        let live = self.live_map();
        for job in live.values() {
            job.cancel.store(true, Ordering::SeqCst);
        }
        live.len()
    }

    /// Seconds a client should wait before retrying a full queue.
    pub fn retry_after(&self, queued: usize) -> u64 {
        let mean = f64::from_bits(self.mean_job_seconds.load(Ordering::Relaxed));
        let workers = self.workers.max(1) as f64;
        let s = (mean * queued as f64 / workers / 4.0).ceil();
        s.clamp(1.0, 600.0) as u64
    }

    fn record_duration(&self, seconds: f64) {
        let old = f64::from_bits(self.mean_job_seconds.load(Ordering::Relaxed));
        let new = 0.8 * old + 0.2 * seconds;
        self.mean_job_seconds
            .store(new.to_bits(), Ordering::Relaxed);
    }

    /// One worker's life: take the oldest queued job, run it, repeat, until
    /// shut down.
    pub fn work(self: &Arc<Self>, pipeline: StableDiffusionPipeline) {
        while !self.is_shutting_down() {
            let seen = self.generation();
            let claimed = {
                let mut live = self.live_map();
                match self.store.claim_next() {
                    Ok(Some(job)) => {
                        let cancel = Arc::new(AtomicBool::new(false));
                        live.insert(
                            job.id.clone(),
                            Live {
                                step: 0,
                                total: job.spec.request.steps,
                                started: Instant::now(),
                                preview: None,
                                cancel: cancel.clone(),
                            },
                        );
                        Some((job, cancel))
                    }
                    Ok(None) => None,
                    Err(e) => {
                        tracing::error!("cannot read the job queue: {e:#}");
                        None
                    }
                }
            };
            match claimed {
                Some((job, cancel)) => self.run(&pipeline, job, cancel),
                None => self.wait_for_work(seen, Duration::from_millis(500)),
            }
        }
    }

    fn run(&self, pipeline: &StableDiffusionPipeline, job: JobRow, cancel: Arc<AtomicBool>) {
        let id = job.id.clone();
        self.emit(JobEvent::Status {
            id: id.clone(),
            status: JobStatus::Running,
            error: None,
        });
        let started = Instant::now();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.generate(pipeline, &job, &cancel)
        }));
        let seconds = started.elapsed().as_secs_f64();
        let (status, error) = match outcome {
            Ok(Ok(result)) => {
                self.record_duration(seconds);
                match self.store.finish_done(&id, &result) {
                    Ok(()) => (JobStatus::Done, None),
                    Err(e) => (JobStatus::Failed, Some(format!("{e:#}"))),
                }
            }
            Ok(Err(e)) => {
                let cancelled = matches!(
                    e.downcast_ref::<ensueno::Error>(),
                    Some(ensueno::Error::Cancelled)
                );
                if cancelled && self.is_shutting_down() && !cancel.load(Ordering::SeqCst) {
                    // Stopped by shutdown, not by the user: run it again next start.
                    if let Err(e) = self.store.requeue(&id) {
                        tracing::error!("cannot requeue job {id}: {e:#}");
                    }
                    self.live_map().remove(&id);
                    return;
                }
                if cancelled {
                    (JobStatus::Cancelled, None)
                } else {
                    (JobStatus::Failed, Some(format!("{e:#}")))
                }
            }
            Err(_) => (
                JobStatus::Failed,
                Some("internal error: the engine panicked on this job".to_string()),
            ),
        };
        let stored = match (status, &error) {
            (JobStatus::Cancelled, _) => self.store.finish_cancelled(&id),
            (JobStatus::Failed, Some(e)) => self.store.finish_failed(&id, e),
            _ => Ok(()),
        };
        if let Err(e) = stored {
            tracing::error!("cannot record the end of job {id}: {e:#}");
        }
        self.live_map().remove(&id);
        tracing::info!("job {id}: {} in {seconds:.2} s", status.as_str());
        self.emit(JobEvent::Status { id, status, error });
    }

    fn generate(
        &self,
        pipeline: &StableDiffusionPipeline,
        job: &JobRow,
        cancel: &AtomicBool,
    ) -> anyhow::Result<JobResult> {
        let spec = &job.spec;
        let mut request = spec.request.clone();
        request.prompt = spec.prompt.clone();
        request.negative_prompt = spec.negative_prompt.clone();
        let init_image = match &spec.init_image {
            Some(name) => {
                let path = self.inputs_dir().join(name);
                let img = image::open(&path)
                    .with_context(|| format!("cannot read the init image {}", path.display()))?;
                Some(img.to_rgb8())
            }
            None => None,
        };
        let is_img2img = init_image.is_some();
        let started = Instant::now();
        let mut on_step = |s: &StepProgress| -> bool {
            if cancel.load(Ordering::SeqCst) || self.is_shutting_down() {
                return false;
            }
            let preview = preview_png(s).map(Arc::<str>::from);
            let eta = {
                let per = started.elapsed().as_secs_f64() / s.step.max(1) as f64;
                per * s.total_steps.saturating_sub(s.step) as f64
            };
            if let Some(l) = self.live_map().get_mut(&job.id) {
                l.step = s.step;
                l.total = s.total_steps;
                l.preview = preview.clone();
            }
            self.emit(JobEvent::Progress {
                id: job.id.clone(),
                step: s.step,
                total: s.total_steps,
                eta,
                preview,
            });
            true
        };
        let output = pipeline.generate(
            &request,
            GenerationInputs {
                init_image,
                latents: None,
                posterior_noise: None,
            },
            &self.limits,
            &mut on_step,
        )?;
        let mut images = Vec::new();
        let mut infotexts = Vec::new();
        for (n, (img, seed)) in output.images.iter().zip(&output.seeds).enumerate() {
            let image_id = format!("{}-{n}", job.id);
            let params = PngParameters::for_image(
                &request,
                *seed,
                (output.width, output.height),
                &pipeline.name,
                is_img2img,
            );
            let text = params.to_text();
            save_png_with_parameters(&image_path(&self.images_dir(), &image_id), img, Some(&text))?;
            images.push(image_id);
            infotexts.push(text);
        }
        Ok(JobResult {
            images,
            seeds: output.seeds.clone(),
            width: output.width,
            height: output.height,
            infotexts,
            warnings: output.warnings.clone(),
            model: pipeline.name.clone(),
            seconds: started.elapsed().as_secs_f64(),
        })
    }
}

/// The file of an image id (the id must have been checked with
/// [`crate::jobs::is_image_id`]).
pub fn image_path(images_dir: &Path, image_id: &str) -> PathBuf {
    images_dir.join(format!("{image_id}.png"))
}

fn preview_png(step: &StepProgress) -> Option<String> {
    let latents = step.pred_original.unwrap_or(step.latents);
    let first = latents.narrow(0, 0, 1).ok()?;
    let img = LatentPreviewer::Linear
        .preview(&first)
        .ok()?
        .into_iter()
        .next()?;
    encode_png_base64(&img)
}

/// An RGB image as base64 PNG.
pub fn encode_png_base64(img: &image::RgbImage) -> Option<String> {
    let mut bytes = Vec::new();
    img.write_to(&mut Cursor::new(&mut bytes), image::ImageFormat::Png)
        .ok()?;
    Some(base64::engine::general_purpose::STANDARD.encode(bytes))
}
