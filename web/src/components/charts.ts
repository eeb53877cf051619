// lightweight-charts set up the kfeed way: times in the viewer's zone (the library counts in
// UTC seconds), prices in dollars with Kalshi's four decimals.
import {
  ColorType,
  createChart,
  type DeepPartial,
  type ChartOptions,
  type IChartApi,
  type Time,
  type UTCTimestamp,
} from "lightweight-charts";
import { formatUtc } from "../format";

const tickFormat = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit" });
const dayFormat = new Intl.DateTimeFormat(undefined, { month: "short", day: "numeric" });
const crosshairFormat = new Intl.DateTimeFormat(undefined, {
  month: "short",
  day: "numeric",
  hour: "2-digit",
  minute: "2-digit",
  second: "2-digit",
});

export function chartSeconds(date: Date): UTCTimestamp {
  return Math.floor(date.getTime() / 1000) as UTCTimestamp;
}

function timeToDate(time: Time): Date {
  return new Date((time as number) * 1000);
}

export function makeChart(container: HTMLElement, height: number, extra: DeepPartial<ChartOptions> = {}): IChartApi {
  return createChart(container, {
    height,
    autoSize: true,
    layout: { background: { type: ColorType.Solid, color: "#ffffff" }, textColor: "#24292f", attributionLogo: false },
    grid: { vertLines: { color: "#f0f2f4" }, horzLines: { color: "#f0f2f4" } },
    rightPriceScale: { borderVisible: false },
    localization: {
      // The crosshair label: local time, and UTC after it (no hover titles inside a canvas).
      timeFormatter: (time: Time) => {
        const date = timeToDate(time);
        return `${crosshairFormat.format(date)} (${formatUtc(date).slice(11)})`;
      },
      priceFormatter: (price: number) => `$${price.toFixed(4).replace(/(\.\d\d\d?)0+$/, "$1").replace(/(\.\d\d)$/, "$1")}`,
    },
    timeScale: {
      timeVisible: true,
      secondsVisible: false,
      borderVisible: false,
      tickMarkFormatter: (time: Time, tickType: number) => {
        const date = timeToDate(time);
        // 0-2: year, month, day marks; 3-4: time of day.
        return tickType < 3 ? dayFormat.format(date) : tickFormat.format(date);
      },
    },
    ...extra,
  });
}
