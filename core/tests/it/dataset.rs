//! Parquet shards as the Hugging Face `datasets` library lays them out, written
//! by pyarrow (snappy, as `datasets` does), read back row for row.

use std::path::Path;
use std::process::Command;

use sluice_core::config::DatasetConfig;
use sluice_core::tasks::{DatasetTask, Split, Task};

/// Writes `gsm8k/main/{train,test}-0000N-of-0000M.parquet` and a conversational
/// file with a list-of-structs `prompt` column.
fn write_shards(root: &Path) {
    let script = r#"
import sys, pyarrow as pa, pyarrow.parquet as pq
root = sys.argv[1]
def rows(lo, hi):
    return pa.table({
        "question": [f"Janet has {i} ducks. How many legs?" for i in range(lo, hi)],
        "answer": [f"Each duck has 2 legs.\n{i} * 2 = <<{i}*2={2*i}>>{2*i}\n#### {2*i:,}" for i in range(lo, hi)],
    })
pq.write_table(rows(0, 700), f"{root}/gsm8k/main/train-00000-of-00002.parquet")
pq.write_table(rows(700, 1500), f"{root}/gsm8k/main/train-00001-of-00002.parquet")
pq.write_table(rows(5000, 5100), f"{root}/gsm8k/main/test-00000-of-00001.parquet")
conv = pa.table({
    "prompt": [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"{i}+{i}?"}] for i in range(3)],
    "solution": [f"$\\boxed{{{2*i}}}$" for i in range(3)],
})
pq.write_table(conv, f"{root}/conv.parquet")
"#;
    std::fs::create_dir_all(root.join("gsm8k/main")).unwrap();
    let out = Command::new(sluice_testkit::python()).args(["-c", script]).arg(root).output().unwrap();
    assert!(out.status.success(), "pyarrow failed:\n{}", String::from_utf8_lossy(&out.stderr));
}

fn config(text: &str) -> DatasetConfig {
    toml::from_str(text).unwrap()
}

#[test]
fn parquet_shards_in_the_datasets_layout_read_as_gsm8k() {
    let dir = tempfile::tempdir().unwrap();
    write_shards(dir.path());
    let root = dir.path().display().to_string();
    let c = config(&format!(
        "path = \"{root}/gsm8k/main\"\nprompt_field = \"question\"\nanswer_format = \"gsm8k\"\nverifier = \"numeric\""
    ));
    let (task, s) = DatasetTask::open_with_summary(&c).unwrap();
    assert_eq!((s.train_rows, s.train_files.len(), s.eval_rows, s.eval_files.len()), (1500, 2, 100, 1));
    let p = task.problem(Split::Train, 701);
    assert_eq!(p.prompt, "Janet has 701 ducks. How many legs?");
    assert_eq!(p.answer, "1402", "`#### 1,402` loses its separator");
    assert_eq!(p.score("The answer is #### 1402"), 1.0);
    assert_eq!(task.problem(Split::Eval, 0).answer, "10000");

    // Conversational rows: the prompt column is a list of messages.
    let c = config(&format!("path = \"{root}/conv.parquet\"\nanswer_field = \"solution\"\nanswer_format = \"boxed\"\nverifier = \"numeric\""));
    let p = DatasetTask::open(&c).unwrap().problem(Split::Train, 2);
    assert_eq!((p.messages.len(), p.messages[0].role.as_str(), p.prompt.as_str(), p.answer.as_str()), (2, "system", "2+2?", "4"));

    // A column that is not there is named with the file and the columns it has.
    let c = config(&format!("path = \"{root}/gsm8k/main/train-00000-of-00002.parquet\"\nprompt_field = \"problem\""));
    let e = DatasetTask::open(&c).unwrap_err().to_string();
    assert!(e.contains("train-00000-of-00002.parquet") && e.contains("`problem`") && e.contains("question"), "{e}");
    // Not Parquet at all.
    std::fs::write(dir.path().join("bad.parquet"), b"not parquet").unwrap();
    let e = DatasetTask::open(&config(&format!("path = \"{root}/bad.parquet\""))).unwrap_err().to_string();
    assert!(e.contains("bad.parquet") && e.contains("Parquet"), "{e}");
    assert_eq!(task.name(), "dataset");
}
