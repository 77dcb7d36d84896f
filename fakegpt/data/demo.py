"""The embedded default dataset: deterministic Telegram-like Portuguese messages, written by this project.

`fakegpt prepare` with no inputs (and a source `path: demo:`) reads this, so the main job runs on a fresh
machine with no files supplied. Two channels: GENERAL (everyday chat, news, football, recipes) and ANTIVAX
(anti-vaccine narratives of the kind the study measures). Messages carry what real exports carry: URLs,
@mentions, emoji, quotes, commas, multi-line text and forwarded duplicates. The text is synthetic and the
claims in ANTIVAX are false on purpose; it exists to exercise the pipeline, not to say anything.
"""

from __future__ import annotations

import csv
import datetime as dt
import functools
import io
import random

GENERAL = 101
ANTIVAX = 102
CHANNELS = {GENERAL: "general", ANTIVAX: "antivax"}
DEFAULT_MESSAGES = 6000
ANTIVAX_SHARE = 0.35
FORWARD_SHARE = 0.04  # forwarded copies of earlier messages (removed by dedupe)

_CITIES = [
    "São Paulo",
    "Recife",
    "Belo Horizonte",
    "Porto Alegre",
    "Salvador",
    "Fortaleza",
    "Curitiba",
    "Manaus",
    "Belém",
    "Goiânia",
    "Florianópolis",
    "Natal",
    "Campinas",
    "Niterói",
    "Maceió",
]
_NAMES = [
    "Ana",
    "João",
    "Maria",
    "José",
    "Francisca",
    "Antônio",
    "Luíza",
    "Carlos",
    "Paulo",
    "Fernanda",
    "Lucas",
    "Juliana",
    "Marcos",
    "Patrícia",
    "Rafael",
    "Camila",
    "Tiago",
    "Beatriz",
]
_HANDLES = [
    "noticias_br",
    "grupo_familia",
    "vizinhanca_zn",
    "canal_do_ze",
    "alerta_saude",
    "verdade_ja",
    "info_cidade",
    "bairro_unido",
    "mae_atenta",
]
_DOMAINS = [
    "g1.globo.com",
    "www.uol.com.br",
    "t.me/canal",
    "youtu.be",
    "www.bbc.com/portuguese",
    "bit.ly",
    "www.folha.uol.com.br",
    "rumble.com",
    "odysee.com",
]
_EMOJI = ["😀", "🙏", "⚠️", "🚨", "👉", "❤️", "😡", "💉", "🇧🇷", "👏", "😂", "🔥", "📢", "✅", "❌"]
_TEAMS = ["Flamengo", "Corinthians", "Palmeiras", "Grêmio", "Bahia", "Sport", "Cruzeiro", "Vasco", "Fortaleza"]
_FOODS = ["feijoada", "pão de queijo", "moqueca", "brigadeiro", "tapioca", "bolo de fubá", "cuscuz", "açaí"]

_GENERAL = [
    "Bom dia, grupo! Hoje em {city} vai fazer {temp} graus, levem guarda-chuva.",
    "Alguém sabe se o posto de saúde do bairro abre no sábado? Preciso renovar a receita da minha mãe.",
    "O {team} ganhou de {goals} a 1 ontem, que jogo! O segundo tempo foi outra coisa.",
    "Receita de {food} da vó {name}: farinha, ovos, leite, uma pitada de sal e muito carinho.",
    "Atenção, moradores: a rua {name} vai ficar sem água amanhã das 8h às 14h, segundo a companhia.",
    "Parabéns, {name}! Muitos anos de vida, saúde e paz. Que Deus abençoe sempre.",
    "A feira de {city} mudou de lugar, agora fica na praça da matriz, perto da escola.",
    "Gente, vacinei meu filho ontem no posto, foi tranquilo, só ficou um pouco dolorido o braço.",
    "Campanha de vacinação contra a gripe começa segunda; idosos e crianças têm prioridade.",
    "O ônibus {line} vai mudar o itinerário a partir de {day}, confiram no site da prefeitura.",
    "Vendo bicicleta aro 26, pouco usada, R$ {price}. Interessados chamem no privado.",
    "Saiu o resultado do concurso! {name}, você viu? Acho que seu nome está na lista.",
    "Chuva forte em {city} hoje à tarde; a defesa civil pediu para evitar as áreas de encosta.",
    "Quem vai no churrasco de domingo traz a {food}? Eu levo o refrigerante e o gelo.",
    "A médica do posto disse que a segunda dose é importante e que os efeitos passam em um ou dois dias.",
    "Estudo da universidade de {city} mostra queda nas internações depois da vacinação em massa.",
    'Perdi um cachorro caramelo perto da padaria, atende por "Pipoca". Quem vir, me avise!',
    "O mercado da esquina está com promoção de {food} até sexta, vale a pena.",
    "Reunião do condomínio marcada para quinta, às 19h, no salão de festas.",
    "Obrigado a todos pelas mensagens, minha mãe já está em casa e se recuperando bem.",
]
_ANTIVAX = [
    "URGENTE!!! Médico de {city} revela que a vacina altera o DNA e ninguém está falando disso.",
    "Não deixem vacinar as crianças! A vacina tem chip e metais pesados, quem avisa amigo é.",
    "Minha vizinha tomou a vacina e no dia seguinte passou mal; coincidência? Acho que não.",
    "Compartilhem antes que apaguem: a vacina é experimental e os efeitos só vão aparecer em {years} anos.",
    'Dizem que é "segura e eficaz", mas por que tantos atletas estão caindo em campo depois da vacina?',
    "A imprensa esconde os mortos pela vacina. Em {city} já são {n} casos que a mídia não mostra.",
    "Tratamento precoce funciona, a vacina não. Eles querem lucrar com o medo do povo.",
    "Passaporte sanitário é controle total! Hoje é a vacina, amanhã é o seu dinheiro.",
    "Enfermeira de {city} confirma: frascos vêm com substâncias que causam infertilidade.",
    "Vacina obrigatória é crime contra a liberdade! Meu corpo, minhas regras.",
    "Estudo secreto mostra que vacinados transmitem mais o vírus. Por que ninguém divulga?",
    "Fiquem atentos: querem vacinar bebês de {months} meses com uma vacina que não foi testada.",
    "O grafeno da vacina deixa o braço magnético, façam o teste com uma moeda e vejam.",
    "Meu tio tomou a terceira dose e teve um infarto. Não tomem, pelo amor de Deus!",
    "A OMS já admitiu que a vacina não impede a transmissão, então pra que obrigar?",
    "Imunidade natural é melhor que qualquer vacina, isso a indústria farmacêutica não conta.",
    "Médicos que falam a verdade estão sendo perseguidos e cassados, a censura chegou.",
    "As farmacêuticas não se responsabilizam pelos efeitos colaterais: leiam a bula!",
    "Quem se vacinou precisa se desintoxicar com chá de {food} e vitamina D, passem adiante.",
    "O governo vai cortar o Bolsa Família de quem não vacinar os filhos, é chantagem!",
]
_OPENERS = [
    "",
    "",
    "",
    "Atenção: ",
    "Gente, ",
    "Pessoal, ",
    "Olha isso: ",
    "Repassando: ",
    "Bom dia! ",
    "*IMPORTANTE* ",
    "Encaminhado: ",
]
_CLOSERS = [
    "",
    "",
    "",
    " Compartilhem!",
    " Repassem para todos os grupos.",
    " O que vocês acham?",
    " Fiquem com Deus.",
    " Abraços a todos.",
    " Confiram no link.",
]


def _fill(template: str, rng: random.Random) -> str:
    return template.format(
        city=rng.choice(_CITIES),
        name=rng.choice(_NAMES),
        team=rng.choice(_TEAMS),
        food=rng.choice(_FOODS),
        temp=rng.randint(14, 39),
        goals=rng.randint(2, 5),
        line=rng.randint(100, 999),
        day=rng.choice(["segunda", "terça", "quarta", "quinta", "sexta"]),
        price=rng.randint(80, 900),
        years=rng.randint(2, 10),
        n=rng.randint(12, 480),
        months=rng.choice([3, 6, 9]),
    )


def _message(rng: random.Random, templates: list[str]) -> str:
    """One message: 1-3 sentences, decorated like real chat (emoji, links, mentions, line breaks)."""
    parts = [_fill(t, rng) for t in rng.sample(templates, rng.choice([1, 1, 2, 2, 3]))]
    text = rng.choice(_OPENERS) + (" " if rng.random() < 0.6 else "\n").join(parts) + rng.choice(_CLOSERS)
    if rng.random() < 0.35:
        text += " " + "".join(rng.choices(_EMOJI, k=rng.randint(1, 3)))
    if rng.random() < 0.3:
        text += f"\n{'https' if rng.random() < 0.8 else 'http'}://{rng.choice(_DOMAINS)}/{rng.randint(1000, 99999)}"
    if rng.random() < 0.12:
        text = f"@{rng.choice(_HANDLES)} " + text
    if rng.random() < 0.1:
        stamp = f"{rng.randint(1, 28):02d}/{rng.randint(1, 12):02d} {rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}"
        text = f"[{stamp}] {rng.choice(_NAMES)}: {text}"  # a forwarded chat header
    return text


def demo_messages(n: int = DEFAULT_MESSAGES, seed: int = 0) -> list[tuple[int, int, str, str]]:
    """`n` rows (id, channel_id, date, message), sorted by date like a real export."""
    rng = random.Random(seed)
    start = dt.datetime(2021, 1, 4, 7, 0, 0)
    rows: list[tuple[int, str, str]] = []
    when = start
    for _ in range(n):
        when += dt.timedelta(minutes=rng.randint(1, 90))
        if rows and rng.random() < FORWARD_SHARE:  # a forward: an earlier message verbatim, same channel
            channel, _, text = rng.choice(rows)
        else:
            channel = ANTIVAX if rng.random() < ANTIVAX_SHARE else GENERAL
            text = _message(rng, _ANTIVAX if channel == ANTIVAX else _GENERAL)
        rows.append((channel, when.isoformat(), text))
    return [(i + 1, c, d, m) for i, (c, d, m) in enumerate(rows)]


@functools.lru_cache(maxsize=4)
def demo_csv(n: int = DEFAULT_MESSAGES, seed: int = 0) -> bytes:
    """The demo data as a well-formed CSV export (RFC 4180, header `id,channel_id,date,message`)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["id", "channel_id", "date", "message"])
    writer.writerows(demo_messages(n, seed))
    return buf.getvalue().encode("utf-8")
