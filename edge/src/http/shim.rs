//! TEMPORARY stand-ins until core::mask's streaming JSON and SSE maskers land.
use custos_core::mask::{Scope, Stats, StreamMasker};

pub struct JsonPath;
impl std::str::FromStr for JsonPath {
    type Err = String;
    fn from_str(_: &str) -> Result<Self, String> {
        Ok(JsonPath)
    }
}
pub struct JsonMasker(StreamMasker, Vec<u8>);
impl JsonMasker {
    pub fn new(scope: Scope<'_>, _paths: Vec<JsonPath>) -> JsonMasker {
        JsonMasker(scope.stream(), Vec::new())
    }
    pub fn push(&mut self, chunk: &[u8], stats: &mut Stats) -> Vec<u8> {
        super::respond::text_push(&mut self.0, &mut self.1, chunk, stats)
    }
    pub fn finish(&mut self, stats: &mut Stats) -> Vec<u8> {
        let mut out = Vec::new();
        if !self.1.is_empty() {
            let s = String::from_utf8_lossy(&self.1).into_owned();
            self.1.clear();
            out.extend(self.0.push(&s, stats).into_bytes());
        }
        out.extend(self.0.finish(stats).into_bytes());
        out
    }
}
pub enum SseMode {
    Text,
    LlmDeltas,
}
pub struct SseMasker(JsonMasker);
impl SseMasker {
    pub fn new(scope: Scope<'_>, _m: SseMode) -> SseMasker {
        SseMasker(JsonMasker::new(scope, vec![]))
    }
    pub fn push(&mut self, chunk: &[u8], stats: &mut Stats) -> Vec<u8> {
        self.0.push(chunk, stats)
    }
    pub fn finish(&mut self, stats: &mut Stats) -> Vec<u8> {
        self.0.finish(stats)
    }
}
