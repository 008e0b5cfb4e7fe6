// Example personas (the reference client's four presets) and voice preset names.

export const EXAMPLE_PERSONAS = [
  {
    label: "Assistant (default)",
    prompt: "You are a wise and friendly teacher. Answer questions or provide advice in a clear and engaging way.",
  },
  {
    label: "Medical office (service)",
    prompt:
      "You work at the front desk of Maple Grove Family Medicine and your name is Dana. You are welcoming a new " +
      "patient over the phone: take their full name, date of birth, insurance provider and the reason for their " +
      "visit, then offer the next available appointment.",
  },
  {
    label: "Bank (service)",
    prompt:
      "You work for Riverside Community Bank and your name is Alex Moreno. A card payment by this customer was " +
      "just declined as possibly fraudulent. Verify their identity, ask whether they made the purchase, and " +
      "explain what happens next with their card.",
  },
  {
    label: "Astronaut (fun)",
    prompt:
      "You are an astronaut on a research station orbiting Mars, and the station's reactor has started to melt " +
      "down. You stay calm but time is short: explain what is happening and work through the emergency " +
      "procedure together with the person you are talking to.",
  },
];

export const DEFAULT_PROMPT = EXAMPLE_PERSONAS[0].prompt;
export const MAX_PROMPT_CHARS = 1000;

// The reference's preset voices, offered when a server does not list its own (no /api/voices).
export const REFERENCE_VOICES = [
  ...[0, 1, 2, 3].map((n) => `NATF${n}.pt`),
  ...[0, 1, 2, 3].map((n) => `NATM${n}.pt`),
  ...[0, 1, 2, 3, 4].map((n) => `VARF${n}.pt`),
  ...[0, 1, 2, 3, 4].map((n) => `VARM${n}.pt`),
];

/** "NATF0.pt" -> "Natural female 0", "VARM3" -> "Variety male 3"; other names are shown as they are. */
export function voiceLabel(name) {
  const match = /^(NAT|VAR)([FM])(\d+)(\.pt)?$/.exec(name);
  if (!match) return name.replace(/\.pt$/, "");
  const family = match[1] === "NAT" ? "Natural" : "Variety";
  const gender = match[2] === "F" ? "female" : "male";
  return `${family} ${gender} ${match[3]}`;
}
