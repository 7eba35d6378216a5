// The Service page's latency chart: answered requests' p50 and p95 latency per minute (uPlot,
// vendored), from the ledger rows the server summarised into the page.
const box = document.getElementById("latency");
const s = JSON.parse(box.dataset.series);
if (s.t.length) {
  new uPlot(
    {
      width: Math.min(900, box.clientWidth || 900),
      height: 240,
      series: [
        {},
        { label: "p50 ms", stroke: "#2a6fdb", width: 2 },
        { label: "p95 ms", stroke: "#d9822b", width: 2 },
      ],
      axes: [{}, { label: "ms" }],
    },
    [s.t, s.p50, s.p95],
    box,
  );
} else {
  box.textContent = "No answered requests in the window yet.";
}
