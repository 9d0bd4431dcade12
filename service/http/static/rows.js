// Rows typed into the page or read from a CSV/NPY file, checked against the model before
// anything is sent; the requests that carry them, each under the service's limits; the CSV
// the page hands back.

/** Input the page refuses: the message names the row and what is expected. */
export class RowsError extends Error {}

const NUMBER = /^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$/;
const FORM = "one row per line, values separated by commas, semicolons, tabs or spaces";

function where(row, line) {
  return line === undefined || line === row ? `row ${row}` : `row ${row} (line ${line})`;
}

function separatorOf(line) {
  for (const sep of [",", ";", "\t"]) if (line.includes(sep)) return sep;
  return null; // runs of spaces
}

function fields(line, sep) {
  const parts = sep === null ? line.trim().split(/\s+/) : line.split(sep);
  return parts.map((p) => p.trim().replace(/^"(.*)"$/, "$1").trim());
}

function tooMany(count, limit) {
  return new RowsError(`more than ${limit} rows (${count} so far): the page scores at most ` +
    `${limit} rows at a time; score bigger files with \`genserve score\``);
}

function checkRow(values, row, line, card) {
  if (values.length !== card.dim) {
    throw new RowsError(`${where(row, line)} has ${values.length} value` +
      `${values.length === 1 ? "" : "s"}; model '${card.name}' expects ${card.dim} (${FORM})`);
  }
}

/** Rows of numbers from pasted text or a CSV/TSV file: `[[number]]`, each of `card.dim`. */
export function parseText(text, card, limit) {
  const trimmed = text.trim();
  if (!trimmed) {
    throw new RowsError(`nothing to score: paste rows of ${card.dim} numbers (${FORM}), ` +
      "or pick a CSV or NPY file");
  }
  if (trimmed.startsWith("[")) return parseJSON(trimmed, card, limit);
  const lines = trimmed.split(/\r?\n/);
  const rows = [];
  let sep;
  let header = false;
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    if (!line.trim() || line.trim().startsWith("#")) continue;
    if (sep === undefined) sep = separatorOf(line);
    const parts = fields(line, sep);
    if (!rows.length && !header && parts.every((p) => !NUMBER.test(p))) {
      header = true; // a first line without a number: column names
      continue;
    }
    const row = rows.length + 1;
    const values = parts.map((p, j) => {
      if (p === "") throw new RowsError(`${where(row, i + 1)}, column ${j + 1} is empty`);
      if (!NUMBER.test(p)) {
        throw new RowsError(`${where(row, i + 1)}, column ${j + 1}: '${p.slice(0, 40)}' is ` +
          "not a finite number");
      }
      return Number(p);
    });
    checkRow(values, row, i + 1, card);
    if (values.some((v) => !Number.isFinite(v))) {
      throw new RowsError(`${where(row, i + 1)} holds a number too large for a float`);
    }
    rows.push(values);
    if (rows.length > limit) throw tooMany(rows.length, limit);
  }
  if (!rows.length) throw new RowsError(`only a header line: no rows of ${card.dim} numbers`);
  return rows;
}

function parseJSON(text, card, limit) {
  let data;
  try {
    data = JSON.parse(text);
  } catch (err) {
    throw new RowsError(`the text starts with '[' but is not JSON (${err.message}); ` +
      `give a list of rows of ${card.dim} numbers, or ${FORM}`);
  }
  if (!Array.isArray(data) || !data.length) {
    throw new RowsError(`expected a JSON list of rows of ${card.dim} numbers`);
  }
  if (!Array.isArray(data[0])) data = [data]; // one row
  if (data.length > limit) throw tooMany(data.length, limit);
  return data.map((item, i) => {
    const values = Array.isArray(item) ? item.flat(Infinity) : [item];
    const bad = values.findIndex((v) => typeof v !== "number" || !Number.isFinite(v));
    if (bad >= 0) {
      throw new RowsError(`${where(i + 1)}, value ${bad + 1}: ` +
        `${JSON.stringify(values[bad])} is not a finite number`);
    }
    checkRow(values, i + 1, undefined, card);
    return values;
  });
}

const NPY_TYPES = {
  f8: Float64Array, f4: Float32Array, i8: BigInt64Array, i4: Int32Array, i2: Int16Array,
  i1: Int8Array, u8: BigUint64Array, u4: Uint32Array, u2: Uint16Array, u1: Uint8Array,
  b1: Uint8Array,
};

/** Rows from a NumPy `.npy` file (`np.save`): `(rows, dim)`, or `(rows, C, H, W)` images. */
export function parseNPY(buffer, card, limit) {
  const bytes = new Uint8Array(buffer);
  const magic = String.fromCharCode(...bytes.slice(1, 6));
  if (bytes[0] !== 0x93 || magic !== "NUMPY") {
    throw new RowsError("not a .npy file (np.save writes one); for text give a CSV file");
  }
  const view = new DataView(buffer);
  const major = bytes[6];
  const length = major === 1 ? view.getUint16(8, true) : view.getUint32(8, true);
  const start = major === 1 ? 10 : 12;
  const header = new TextDecoder("latin1").decode(bytes.slice(start, start + length));
  const descr = /'descr':\s*'([<>|=])([a-z])(\d+)'/.exec(header);
  const fortran = /'fortran_order':\s*True/.test(header);
  const shapeText = /'shape':\s*\(([^)]*)\)/.exec(header);
  if (!descr || !shapeText) throw new RowsError("the .npy header is not readable");
  const type = NPY_TYPES[descr[2] + descr[3]];
  if (!type || descr[1] === ">") {
    throw new RowsError(`the .npy array holds '${descr.slice(1).join("")}'; the page reads ` +
      "little-endian floats, integers and booleans");
  }
  const shape = shapeText[1].split(",").map((s) => s.trim()).filter(Boolean).map(Number);
  let rows = shape.length ? shape[0] : 1;
  let width = shape.slice(1).reduce((a, b) => a * b, 1);
  if (shape.length === 1 && card.dim !== 1) [rows, width] = [1, shape[0]]; // one row
  if (width !== card.dim) {
    throw new RowsError(`the .npy array has shape (${shape.join(", ")}): rows of ${width} ` +
      `values; model '${card.name}' expects ${card.dim}` +
      (card.shape.length > 1 ? ` (shape ${card.shape.join(" x ")})` : ""));
  }
  if (rows > limit) throw tooMany(rows, limit);
  if (fortran && shape.length > 2) {
    throw new RowsError("the .npy array is in Fortran order; save np.ascontiguousarray(x)");
  }
  const data = new type(buffer.slice(start + length, start + length + rows * width * type.BYTES_PER_ELEMENT));
  if (data.length < rows * width) throw new RowsError("the .npy file is shorter than its shape");
  const out = [];
  for (let i = 0; i < rows; i++) {
    const values = new Array(width);
    for (let j = 0; j < width; j++) {
      const v = Number(data[fortran ? j * rows + i : i * width + j]);
      if (!Number.isFinite(v)) {
        throw new RowsError(`${where(i + 1)}, column ${j + 1} is ${v}: every value must be a ` +
          "finite number");
      }
      values[j] = v;
    }
    out.push(values);
  }
  return out;
}

/** JSON bodies `{model, x}` over consecutive rows, each at most `maxRows` rows and under
 * `maxBytes` bytes (halving the rows until it fits). */
export function* requestBodies(model, rows, maxRows, maxBytes) {
  let size = Math.max(1, maxRows);
  for (let at = 0; at < rows.length;) {
    let part = rows.slice(at, at + size);
    let body = JSON.stringify({model, x: part});
    while (body.length > maxBytes && part.length > 1) {
      size = Math.ceil(part.length / 2);
      part = rows.slice(at, at + size);
      body = JSON.stringify({model, x: part});
    }
    yield {body, rows: part.length};
    at += part.length;
  }
}

/** A CSV text of `columns` (names) over `records` (arrays of values). */
export function toCSV(columns, records) {
  const lines = [columns.join(",")];
  for (const record of records) lines.push(record.map(String).join(","));
  return lines.join("\n") + "\n";
}
