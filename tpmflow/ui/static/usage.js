// The Usage page's chart: service units spent over time (uPlot, vendored), from the ledger rows
// the server wrote into the page.
const box = document.getElementById("chart");
const series = JSON.parse(box.dataset.series);
if (series.t.length) {
  const width = Math.min(900, box.clientWidth || 900);
  new uPlot(
    {
      width,
      height: 260,
      series: [{}, { label: "SU spent", stroke: "#2a6fdb", width: 2 }],
      axes: [{}, { label: "SU" }],
    },
    [series.t, series.su],
    box,
  );
} else {
  box.textContent = "No charged requests yet.";
}
