// edgetl's host-side preprocessing (policy "shorter-center/v1"), in the browser: the centre crop of
// edgetl.data.preprocess.crop_box, then OpenCV's resize as cv2.resize computes it on uint8 pixels
// (INTER_AREA when shrinking more than 2x, INTER_LINEAR for milder shrinking, INTER_CUBIC when
// enlarging), in the same fixed-point arithmetic, so that the model sees the pixels `edgetl predict`
// gives it. Canvas drawImage resampling is not used: it differs from OpenCV's.

const COEF_BITS = 11;
const COEF_SCALE = 1 << COEF_BITS; // INTER_RESIZE_COEF_SCALE
const f32 = Math.fround;

// Python's round(): half to even.
function roundHalfEven(x) {
  const r = Math.round(x);
  return (Math.abs(x % 1) === 0.5 && r % 2 !== 0) ? r - 1 : r;
}

// cvRound of a float (round half to even) saturated to int16, as saturate_cast<short>.
function toShort(x) {
  return Math.max(-32768, Math.min(32767, roundHalfEven(x)));
}

export function cropBox(h, w, spec) {
  const [outH, outW] = spec.input_size;
  const scale = Math.max(spec.resize_size / Math.min(h, w), outH / h, outW / w);
  const ch = Math.min(h, roundHalfEven(outH / scale));
  const cw = Math.min(w, roundHalfEven(outW / scale));
  return [Math.floor((h - ch) / 2), Math.floor((w - cw) / 2), ch, cw];
}

// Source index and fixed-point weights along one axis (cv::resize's xofs/ialpha tables).
function linearTable(src, dst) {
  const scale = 1 / (dst / src);
  const ofs = new Int32Array(dst);
  const a = new Int16Array(dst * 2);
  for (let d = 0; d < dst; d++) {
    let fx = f32((d + 0.5) * scale - 0.5);
    let sx = Math.floor(fx);
    fx = f32(fx - sx);
    if (sx < 0) { fx = 0; sx = 0; }
    if (sx >= src - 1) { fx = 0; sx = src - 1; }
    ofs[d] = sx;
    a[2 * d] = toShort(f32(f32(1 - fx) * COEF_SCALE));
    a[2 * d + 1] = toShort(f32(fx * COEF_SCALE));
  }
  return [ofs, a];
}

// OpenCV 5 enlarges uint8 images with INTER_CUBIC in floating point: positions and coefficients in
// double precision, stored as float32; sums in float32 (measured bit-exact against cv2.resize).
function cubicCoeffs(x) {
  const A = -0.75;
  const c0 = ((A * (x + 1) - 5 * A) * (x + 1) + 8 * A) * (x + 1) - 4 * A;
  const c1 = ((A + 2) * x - (A + 3)) * x * x + 1;
  const c2 = ((A + 2) * (1 - x) - (A + 3)) * (1 - x) * (1 - x) + 1;
  return [f32(c0), f32(c1), f32(c2), f32(1 - c0 - c1 - c2)];
}

function cubicTable(src, dst) {
  const scale = 1 / (dst / src);
  const ofs = new Int32Array(dst);
  const a = new Float32Array(dst * 4);
  for (let d = 0; d < dst; d++) {
    let fx = (d + 0.5) * scale - 0.5;
    const sx = Math.floor(fx);
    fx -= sx;
    ofs[d] = sx;
    a.set(cubicCoeffs(fx), 4 * d);
  }
  return [ofs, a];
}

const clamp = (v, lo, hi) => (v < lo ? lo : v > hi ? hi : v);

// rgba: Uint8ClampedArray/Uint8Array of the whole image (width w); the region (top, left, ch, cw).
// Returns rows [ch][dw*3] of horizontally resized values: fixed point (Int32Array) for linear, float32 for cubic.
function hresize(rgba, w, top, left, ch, cw, dw, cubic) {
  const [ofs, a] = cubic ? cubicTable(cw, dw) : linearTable(cw, dw);
  const rows = new Array(ch);
  for (let y = 0; y < ch; y++) {
    const row = cubic ? new Float32Array(dw * 3) : new Int32Array(dw * 3);
    const base = ((top + y) * w + left) * 4;
    for (let d = 0; d < dw; d++) {
      const sx = ofs[d];
      for (let c = 0; c < 3; c++) {
        let v = 0;
        if (cubic) {
          for (let k = 0; k < 4; k++) v = f32(v + f32(rgba[base + clamp(sx - 1 + k, 0, cw - 1) * 4 + c] * a[4 * d + k]));
        } else {
          const s1 = Math.min(sx + 1, cw - 1);
          v = rgba[base + sx * 4 + c] * a[2 * d] + rgba[base + s1 * 4 + c] * a[2 * d + 1];
        }
        row[d * 3 + c] = v;
      }
    }
    rows[y] = row;
  }
  return rows;
}

// (a * b) >> 16 on int16 lanes (v_mul_hi), after the >> 4 that packs int32 into int16 (saturating).
const mulhi = (s, b) => ((clamp(s >> 4, -32768, 32767) * b) >> 16);

function resizeLinear(rgba, w, top, left, ch, cw, dh, dw) {
  const rows = hresize(rgba, w, top, left, ch, cw, dw, false);
  const [ofs, b] = linearTable(ch, dh);
  const out = new Uint8Array(dh * dw * 3);
  for (let d = 0; d < dh; d++) {
    const s0 = rows[ofs[d]], s1 = rows[Math.min(ofs[d] + 1, ch - 1)];
    const b0 = b[2 * d], b1 = b[2 * d + 1];
    const o = d * dw * 3;
    for (let x = 0; x < dw * 3; x++) {
      // OpenCV's SIMD path (VResizeLinearVec_32s8u): the one x86 and ARM builds take
      out[o + x] = clamp((mulhi(s0[x], b0) + mulhi(s1[x], b1) + 2) >> 2, 0, 255);
    }
  }
  return out;
}

function resizeCubic(rgba, w, top, left, ch, cw, dh, dw) {
  const rows = hresize(rgba, w, top, left, ch, cw, dw, true);
  const [ofs, b] = cubicTable(ch, dh);
  const out = new Uint8Array(dh * dw * 3);
  for (let d = 0; d < dh; d++) {
    const r = [0, 1, 2, 3].map((k) => rows[clamp(ofs[d] - 1 + k, 0, ch - 1)]);
    const o = d * dw * 3;
    for (let x = 0; x < dw * 3; x++) {
      let v = 0;
      for (let k = 0; k < 4; k++) v = f32(v + f32(r[k][x] * b[4 * d + k]));
      out[o + x] = clamp(roundHalfEven(v), 0, 255);
    }
  }
  return out;
}

// INTER_AREA when shrinking: OpenCV's resizeArea_ (float32 weights of the covered source cells, row
// sums in float32, rounded at the end), or its integer-factor path when both factors are whole.
function areaTable(src, dst) {
  const scale = 1 / (dst / src);
  const tab = []; // [dst index, src index, alpha]
  for (let d = 0; d < dst; d++) {
    const fs1 = d * scale, fs2 = fs1 + scale;
    const cell = Math.min(scale, src - fs1);
    let s2 = Math.min(Math.floor(fs2), src - 1);
    const s1 = Math.min(Math.ceil(fs1), s2);
    if (s1 - fs1 > 1e-3) tab.push([d, s1 - 1, f32((s1 - fs1) / cell)]);
    for (let s = s1; s < s2; s++) tab.push([d, s, f32(1 / cell)]);
    if (fs2 - s2 > 1e-3) tab.push([d, s2, f32(Math.min(Math.min(fs2 - s2, 1), cell) / cell)]);
  }
  return tab;
}

function resizeAreaFast(rgba, w, top, left, sx, sy, dh, dw) {
  const out = new Uint8Array(dh * dw * 3);
  const scale = f32(1 / (sx * sy));
  for (let d = 0; d < dh; d++) {
    for (let x = 0; x < dw; x++) {
      for (let c = 0; c < 3; c++) {
        let sum = 0;
        for (let yy = 0; yy < sy; yy++) {
          const base = ((top + d * sy + yy) * w + left + x * sx) * 4 + c;
          for (let xx = 0; xx < sx; xx++) sum += rgba[base + xx * 4];
        }
        out[(d * dw + x) * 3 + c] = sx === 2 && sy === 2 ? (sum + 2) >> 2 : clamp(roundHalfEven(f32(sum * scale)), 0, 255);
      }
    }
  }
  return out;
}

function resizeArea(rgba, w, top, left, ch, cw, dh, dw) {
  const sx = cw / dw, sy = ch / dh;
  if (Number.isInteger(sx) && Number.isInteger(sy)) return resizeAreaFast(rgba, w, top, left, sx, sy, dh, dw);
  const tx = areaTable(cw, dw), ty = areaTable(ch, dh);
  const out = new Uint8Array(dh * dw * 3);
  const buf = new Float32Array(dw * 3), sum = new Float32Array(dw * 3);
  let prev = 0;
  const flush = (row) => {
    for (let x = 0; x < dw * 3; x++) out[row * dw * 3 + x] = clamp(roundHalfEven(sum[x]), 0, 255);
  };
  for (const [dy, syy, beta] of ty) {
    buf.fill(0);
    const base = ((top + syy) * w + left) * 4;
    for (const [dx, sxx, alpha] of tx) {
      const i = base + sxx * 4, o = dx * 3;
      buf[o] = f32(buf[o] + f32(rgba[i] * alpha));
      buf[o + 1] = f32(buf[o + 1] + f32(rgba[i + 1] * alpha));
      buf[o + 2] = f32(buf[o + 2] + f32(rgba[i + 2] * alpha));
    }
    if (dy !== prev) {
      flush(prev);
      for (let x = 0; x < dw * 3; x++) sum[x] = f32(beta * buf[x]);
      prev = dy;
    } else {
      for (let x = 0; x < dw * 3; x++) sum[x] = f32(sum[x] + f32(beta * buf[x]));
    }
  }
  flush(prev);
  return out;
}

// RGBA pixels (width w, height h) → the model's uint8 RGB input [H*W*3] for `spec`.
export function resizeCrop(rgba, w, h, spec) {
  const [top, left, ch, cw] = cropBox(h, w, spec);
  const [outH, outW] = spec.input_size;
  if (ch === outH && cw === outW) {
    const out = new Uint8Array(outH * outW * 3);
    for (let y = 0; y < outH; y++) {
      for (let x = 0; x < outW; x++) {
        const i = ((top + y) * w + left + x) * 4, o = (y * outW + x) * 3;
        out[o] = rgba[i]; out[o + 1] = rgba[i + 1]; out[o + 2] = rgba[i + 2];
      }
    }
    return out;
  }
  const shrink = outH / ch;
  const fn = shrink < 0.5 ? resizeArea : shrink < 1 ? resizeLinear : resizeCubic;
  return fn(rgba, w, top, left, ch, cw, outH, outW);
}

// A JPEG much larger than the model needs is decoded by edgetl at 1/2, 1/4 or 1/8 scale (libjpeg's
// DCT scaling). A browser decodes at full size; this box average by the same factor stands in for it.
export function jpegScale(w, h, resizeSize) {
  for (const f of [8, 4, 2]) if (Math.floor(Math.min(w, h) / f) >= resizeSize) return f;
  return 1;
}

export function boxReduce(rgba, w, h, f) {
  const ow = Math.ceil(w / f), oh = Math.ceil(h / f);
  const out = new Uint8ClampedArray(ow * oh * 4);
  for (let y = 0; y < oh; y++) {
    for (let x = 0; x < ow; x++) {
      let r = 0, g = 0, b = 0, n = 0;
      for (let yy = y * f; yy < Math.min(h, y * f + f); yy++) {
        for (let xx = x * f; xx < Math.min(w, x * f + f); xx++) {
          const i = (yy * w + xx) * 4;
          r += rgba[i]; g += rgba[i + 1]; b += rgba[i + 2]; n++;
        }
      }
      const o = (y * ow + x) * 4;
      out[o] = r / n; out[o + 1] = g / n; out[o + 2] = b / n; out[o + 3] = 255;
    }
  }
  return [out, ow, oh];
}
