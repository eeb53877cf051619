// Feed gaps from storage (ListFeedGaps) and from a live stream, as one list.
import type { FeedGap } from "@gen/kfeed/v1/types_pb.js";

/** One entry per gap, the live state first (a gap is sent again when it recovers), newest first. */
export function mergeGaps(stored: readonly FeedGap[], live: readonly FeedGap[]): FeedGap[] {
  const byId = new Map<bigint, FeedGap>();
  for (const gap of [...stored, ...live]) byId.set(gap.gapId, gap);
  const seconds = (gap: FeedGap) => Number(gap.detectTime?.seconds ?? 0n) + (gap.detectTime?.nanos ?? 0) / 1e9;
  return [...byId.values()].sort((a, b) => seconds(b) - seconds(a) || Number(b.gapId - a.gapId));
}
