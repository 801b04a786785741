"""Drives the playground page at / in headless Chromium (Debian's package, through Playwright):
uploads an example image, asks a question, and checks that the streamed answer appears with its
timings; then ranks the example images against one example's caption on the embeddings tab.

Usage: playground_check.py BASE_URL EXAMPLES_DIR [--screenshot PNG]
EXAMPLES_DIR holds examples.json (file, caption per image) and the images, as models/demo/examples.
"""

import argparse
import json
import pathlib
import shutil
import sys

from playwright.sync_api import expect, sync_playwright

TIMEOUT_MS = 60_000


def chromium_path():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    sys.exit("no Chromium on PATH (scripts/install-deps.sh installs Debian's chromium)")


def check_chat(page, example, image):
    expect(page.locator("#chat-model option")).not_to_have_count(0, timeout=TIMEOUT_MS)
    page.set_input_files("#chat-image", str(image))
    expect(page.locator("#chat-preview")).to_be_visible()
    page.fill("#chat-question", "Describe the image.")
    page.click("#chat-send")
    answer = page.locator("#chat-answer")
    expect(answer).to_have_attribute("data-done", "true", timeout=TIMEOUT_MS)
    text = answer.inner_text().strip()
    stats = page.locator("#chat-stats").inner_text()
    print(f"chat: {text!r} ({stats})")
    assert text == example["caption"], f"answer {text!r}, expected {example['caption']!r}"
    assert "TTFT" in stats and "tokens/s" in stats, stats


def check_embeddings(page, examples, images):
    page.click("#tab-embed")
    expect(page.locator("#embed-model option")).not_to_have_count(0, timeout=TIMEOUT_MS)
    target = examples[0]
    page.fill("#embed-query", target["caption"])
    page.set_input_files("#embed-images", [str(p) for p in images])
    page.click("#embed-rank")
    rows = page.locator("#embed-results li")
    expect(rows).to_have_count(len(images), timeout=TIMEOUT_MS)
    top = rows.first.inner_text()
    print(f"embeddings: query {target['caption']!r}, top {top!r}")
    assert top.endswith(target["file"]), f"top result {top!r}, expected {target['file']}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("base")
    ap.add_argument("examples", type=pathlib.Path)
    ap.add_argument("--screenshot", type=pathlib.Path)
    args = ap.parse_args()
    examples = json.loads((args.examples / "examples.json").read_text())
    images = [args.examples / e["file"] for e in examples]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 900, "height": 640})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(args.base + "/")
        check_chat(page, examples[0], images[0])
        if args.screenshot:
            page.screenshot(path=str(args.screenshot))
        check_embeddings(page, examples, images)
        browser.close()
    assert not errors, f"errors on the page: {errors}"
    print("playground: the chat and embeddings checks passed")


if __name__ == "__main__":
    main()
