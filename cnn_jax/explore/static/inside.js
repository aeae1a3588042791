// Feature-map grids: a click on a tile asks the server for that channel.
// Each grid picture carries its layout (tile cell size in picture pixels,
// columns, channels); the click is mapped back to picture pixels.
element.addEventListener('click', (event) => {
  const img = event.target.closest('img.fmap');
  if (!img) return;
  const box = img.getBoundingClientRect();
  const x = (event.clientX - box.left) * img.naturalWidth / box.width;
  const y = (event.clientY - box.top) * img.naturalHeight / box.height;
  const cell = Number(img.dataset.cell);
  const cols = Number(img.dataset.cols);
  const column = Math.min(Math.floor(x / cell), cols - 1);
  const channel = Math.floor(y / cell) * cols + column;
  if (channel < Number(img.dataset.channels)) {
    trigger('pick', {stage: img.dataset.stage, channel: channel});
  }
});
