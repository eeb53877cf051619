import type { Timestamp } from "@bufbuild/protobuf/wkt";
import { formatLocal, formatUtc, toDate } from "../format";

/** A time in the viewer's zone; UTC on hover. */
export function Time({ value, date }: { value?: Timestamp; date?: Date }) {
  const when = date ?? toDate(value);
  if (when === undefined) return <span>—</span>;
  return (
    <time dateTime={when.toISOString()} title={formatUtc(when)}>
      {formatLocal(when)}
    </time>
  );
}
