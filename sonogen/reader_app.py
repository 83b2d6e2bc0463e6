"""The reader study's web page (FastAPI): one image at a time for the reader whose token is in the link; every
answer is on disk before the next image is shown; the key is never read here, and a wrong token is 403."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from sonogen.reader_study import Study


class Answer(BaseModel):
    image: str
    answer: str
    realism: int
    lesion_plausible: bool | None = None

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Reader study</title>
<style>
body { font-family: sans-serif; max-width: 46rem; margin: 2rem auto; }
img { width: 24rem; height: 24rem; image-rendering: pixelated; background: #000; display: block; }
button[aria-pressed="true"] { background: #246; color: #fff; }
.row { margin: .8rem 0; }
</style></head>
<body>
<h1>Real or synthetic?</h1>
<p id="progress"></p>
<div id="question">
  <img id="image" alt="ultrasound image to judge">
  <div class="row">This image is:
    <button id="real" data-answer="real">Real (R)</button>
    <button id="synthetic" data-answer="synthetic">Synthetic (S)</button></div>
  <div class="row">Realism, 1 (clearly artificial) to 5 (indistinguishable):
    <span id="realism"></span></div>
  <div class="row" id="lesion" hidden>Is the lesion plausible?
    <button id="lesion-yes" data-lesion="true">Yes (Y)</button>
    <button id="lesion-no" data-lesion="false">No (N)</button></div>
  <div class="row"><button id="submit" disabled>Save and next (Enter)</button></div>
</div>
<p id="done" hidden>Thank you: every answer is saved. You can close this page.</p>
<p id="error" role="alert"></p>
<script>
const base = window.location.pathname.replace(/\\/$/, "");
let state = null, choice = {};
for (let k = 1; k <= 5; k++) {
  const b = document.createElement("button"); b.textContent = k; b.id = "realism-" + k;
  b.onclick = () => pick({realism: k}); document.getElementById("realism").appendChild(b);
}
document.getElementById("real").onclick = () => pick({answer: "real"});
document.getElementById("synthetic").onclick = () => pick({answer: "synthetic"});
document.getElementById("lesion-yes").onclick = () => pick({lesion_plausible: true});
document.getElementById("lesion-no").onclick = () => pick({lesion_plausible: false});
document.getElementById("submit").onclick = submit;
document.addEventListener("keydown", (e) => {
  const keys = {r: {answer: "real"}, s: {answer: "synthetic"}, y: {lesion_plausible: true},
                n: {lesion_plausible: false}};
  if (keys[e.key.toLowerCase()]) pick(keys[e.key.toLowerCase()]);
  else if (/^[1-5]$/.test(e.key)) pick({realism: Number(e.key)});
  else if (e.key === "Enter") submit();
});
function ready() {
  return choice.answer && choice.realism && (!state.lesion_question || typeof choice.lesion_plausible === "boolean");
}
function pick(part) {
  Object.assign(choice, part);
  for (const b of document.querySelectorAll("button")) {
    const pressed = (b.dataset.answer && b.dataset.answer === choice.answer) ||
      (b.id === "realism-" + choice.realism) || (b.dataset.lesion && b.dataset.lesion === String(choice.lesion_plausible));
    b.setAttribute("aria-pressed", pressed ? "true" : "false");
  }
  document.getElementById("submit").disabled = !ready();
}
function show(next) {
  state = next; choice = {}; pick({});
  document.getElementById("progress").textContent = "Image " + (state.answered + 1) + " of " + state.total;
  if (state.image === null) {
    document.getElementById("question").hidden = true; document.getElementById("done").hidden = false;
    document.getElementById("progress").textContent = state.total + " of " + state.total + " answered";
    return;
  }
  document.getElementById("lesion").hidden = !state.lesion_question;
  document.getElementById("image").src = base + "/images/" + state.image + ".png";
}
async function submit() {
  if (!state || state.image === null || !ready()) return;
  document.getElementById("submit").disabled = true;
  const reply = await fetch(base + "/answers", {method: "POST", headers: {"Content-Type": "application/json"},
                                                  body: JSON.stringify({image: state.image, ...choice})});
  const body = await reply.json();
  if (!reply.ok) { document.getElementById("error").textContent = body.detail; return; }
  document.getElementById("error").textContent = ""; show(body);
}
fetch(base + "/state").then((r) => r.json()).then(show);
</script>
</body></html>
"""


def create_app(folder: str | Path):
    """The app of the study in ``folder``: ``/r/TOKEN`` the page, ``/r/TOKEN/state`` where the reader is,
    ``/r/TOKEN/images/ID.png`` an image of the study, ``POST /r/TOKEN/answers`` an answer."""
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import FileResponse, HTMLResponse

    study = Study(folder)
    app = FastAPI(title="sonogen reader study", docs_url=None, redoc_url=None, openapi_url=None)

    def reader(token: str) -> str:
        name = study.reader_of(token)
        if name is None:
            raise HTTPException(403, "this reader link is not valid for this study")
        return name

    def state(name: str) -> dict:
        answered, image = study.next_image(name)
        return {"answered": answered, "total": len(study.meta["images"]), "image": image,
                "lesion_question": bool(study.meta["lesion_question"])}

    @app.get("/r/{token}", response_class=HTMLResponse)
    def page(token: str) -> str:
        reader(token)
        return PAGE

    @app.get("/r/{token}/state")
    def where(token: str) -> dict:
        return state(reader(token))

    @app.get("/r/{token}/images/{image}.png")
    def image(token: str, image: str):
        reader(token)
        path = study.image_path(image)
        if path is None:
            raise HTTPException(404, "no such image in this study")
        return FileResponse(path, media_type="image/png", headers={"Cache-Control": "no-store"})

    @app.post("/r/{token}/answers")
    def answer(token: str, body: Answer) -> dict:
        name = reader(token)
        try:
            study.answer(name, body.image, body.answer, body.realism, body.lesion_plausible)
        except ValueError as err:
            raise HTTPException(400, str(err)) from None
        return state(name)

    return app


def serve(folder: str | Path, host: str = "127.0.0.1", port: int = 8090) -> None:
    import uvicorn

    uvicorn.run(create_app(folder), host=host, port=port, log_level="warning")
