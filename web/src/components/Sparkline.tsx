/** A small SVG line of recent prices (no axes: the trend at a glance). */
export function Sparkline({ values, width = 120, height = 28 }: {
  values: number[];
  width?: number;
  height?: number;
}) {
  if (values.length < 2) return <svg className="spark" width={width} height={height} />;
  const min = Math.min(...values);
  const max = Math.max(...values);
  const span = max - min || 1;
  const step = width / (values.length - 1);
  const points = values
    .map((v, i) => `${(i * step).toFixed(1)},${(height - 2 - ((v - min) / span) * (height - 4)).toFixed(1)}`)
    .join(" ");
  const rising = values[values.length - 1] >= values[0];
  return (
    <svg className="spark" width={width} height={height} aria-label="recent prices">
      <polyline points={points} fill="none" stroke={rising ? "#1a7f37" : "#cf222e"} strokeWidth="1.5" />
    </svg>
  );
}
