#![no_main]
use custos_core::mask::{JsonMasker, Stats};
use custos_fuzz::masker;
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    for body in data.split(|&c| c == b'\n') {
        let mut jm = JsonMasker::new(masker().audit_scope(), vec![]);
        let mut st = Stats::default();
        let mut out = jm.push(body, &mut st);
        out.extend(jm.finish(&mut st));
        eprintln!("{:?} -> {:?}", String::from_utf8_lossy(body), String::from_utf8_lossy(&out));
    }
    let t = "token:\"Al+ient_s";
    eprintln!("mask_text {:?} -> {:?}", t, masker().mask_text(t, &mut Stats::default()));
});
