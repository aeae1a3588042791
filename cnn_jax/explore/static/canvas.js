// The drawing canvas: pointer events (mouse, pen and touch) draw dark ink on
// light paper; at the end of each stroke the canvas is sent as a PNG data:
// URI by setting the component's value, which fires its change event.
const canvas = element.querySelector('canvas.pad');
const width = element.querySelector('input.brush');
const ctx = canvas.getContext('2d');
let drawing = false;
let last = null;

function paper() {
  ctx.fillStyle = '#ffffff';
  ctx.fillRect(0, 0, canvas.width, canvas.height);
}

function at(event) {
  const box = canvas.getBoundingClientRect();
  return [(event.clientX - box.left) * canvas.width / box.width,
          (event.clientY - box.top) * canvas.height / box.height];
}

function line(from, to) {
  ctx.strokeStyle = '#000000';
  ctx.lineWidth = Number(width.value);
  ctx.lineCap = 'round';
  ctx.lineJoin = 'round';
  ctx.beginPath();
  ctx.moveTo(from[0], from[1]);
  ctx.lineTo(to[0], to[1]);
  ctx.stroke();
}

function finish(event) {
  if (!drawing) return;
  drawing = false;
  props.value = canvas.toDataURL('image/png');
}

paper();
canvas.addEventListener('pointerdown', (event) => {
  drawing = true;
  last = at(event);
  line(last, last);
  canvas.setPointerCapture(event.pointerId);
  event.preventDefault();
});
canvas.addEventListener('pointermove', (event) => {
  if (!drawing) return;
  const point = at(event);
  line(last, point);
  last = point;
  event.preventDefault();
});
canvas.addEventListener('pointerup', finish);
canvas.addEventListener('pointercancel', finish);
element.querySelector('button.clear').addEventListener('click', () => {
  paper();
  props.value = '';
});
